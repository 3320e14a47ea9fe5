"""The table between official PyTorch state-dict names and Flax variables.

Flax submodules carry the official names, so the module path of a key maps one to one:
dots become nesting and a list index joins its list (`cv_learner.block2.3.conv1` ->
`cv_learner/block2_3/conv1`, `conv2ds.0` -> `conv2ds_0`). Only the leaf changes:

| PyTorch leaf            | Flax collection / leaf | layout change                   |
|-------------------------|------------------------|---------------------------------|
| conv `weight` (O,I,H,W) | params / `kernel`      | -> (H, W, I, O)                 |
| linear `weight` (O, I)  | params / `kernel`      | -> (I, O)                       |
| norm `weight` (C,)      | params / `scale`       |                                 |
| `bias`                  | params / `bias`        |                                 |
| `running_mean`          | batch_stats / `mean`   |                                 |
| `running_var`           | batch_stats / `var`    |                                 |
| GeM `p` (1,)            | params / `p`           |                                 |
| `num_batches_tracked`   | (dropped)              |                                 |
| AMES `mtc_token`, `W`,  | params / same name     | none (kept in PyTorch layout)   |
| `in_proj_weight`/`_bias`|                        |                                 |
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

from scvnet_jax.errors import CheckpointError
from scvnet_jax.models.arch import Arch
from scvnet_jax.models.resnet import depth_from_stage_blocks
_LIST_ITEM = re.compile(r"^(.*)_(\d+)$")
_SKIPPED_LEAVES = ("num_batches_tracked",)
# parameters stored as they are: AMES's matching token, its binarization projection W
# (local_dim, bits), nn.MultiheadAttention's packed q/k/v projection
_VERBATIM_LEAVES = ("mtc_token", "W", "in_proj_weight", "in_proj_bias")


def _flax_module_path(torch_modules: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for part in torch_modules:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _torch_module_path(flax_modules: tuple[str, ...]) -> str:
    parts = []
    for name in flax_modules:
        m = _LIST_ITEM.match(name)
        parts.extend([m.group(1), m.group(2)] if m else [name])
    return ".".join(parts)


def torch_to_flax(key: str, value: np.ndarray):
    """(collection, flax path, array in Flax layout) for one state-dict entry, or None."""
    *mods, leaf = key.split(".")
    if leaf in _SKIPPED_LEAVES:
        return None
    path = _flax_module_path(mods)
    if leaf == "weight":
        if value.ndim == 4:
            return "params", path + ("kernel",), np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 2:
            return "params", path + ("kernel",), value.T
        return "params", path + ("scale",), value
    if leaf in ("bias", "p") or leaf in _VERBATIM_LEAVES:
        return "params", path + (leaf,), value
    if leaf == "running_mean":
        return "batch_stats", path + ("mean",), value
    if leaf == "running_var":
        return "batch_stats", path + ("var",), value
    raise CheckpointError(f"unexpected state-dict entry {key!r} (unknown leaf {leaf!r})")


def flax_to_torch(collection: str, path: tuple[str, ...], shape: tuple[int, ...]):
    """Inverse of `torch_to_flax` for names and shapes: (torch key, torch shape)."""
    prefix, leaf = _torch_module_path(path[:-1]), path[-1]
    prefix = prefix + "." if prefix else ""     # "" for the model's own (AMES mtc_token)
    if collection == "batch_stats":
        return f"{prefix}running_{leaf}", shape
    if leaf == "kernel":
        if len(shape) == 4:
            h, w, i, o = shape
            return f"{prefix}weight", (o, i, h, w)
        return f"{prefix}weight", tuple(reversed(shape))
    if leaf == "scale":
        return f"{prefix}weight", shape
    return f"{prefix}{leaf}", shape


def expected_state_dict_shapes(abstract_variables: Mapping[str, Any]) -> dict[str, tuple]:
    """{torch key: torch shape} a checkpoint for these (abstract) Flax variables must hold."""
    out = {}
    for collection, tree in abstract_variables.items():
        for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            path = tuple(str(k.key) for k in kp)
            key, shape = flax_to_torch(collection, path, tuple(leaf.shape))
            out[key] = shape
    return out


def strip_wrappers(obj: Any, source: str) -> dict[str, np.ndarray]:
    """The state dict inside a loaded checkpoint: `obj["model_state"]` or `obj` itself,
    with a DataParallel `module.` prefix removed."""
    if isinstance(obj, Mapping) and "model_state" in obj:
        obj = obj["model_state"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: expected a state dict ({{name: tensor}}) or "
                              f"{{'model_state': state_dict}}, got {type(obj).__name__}")
    sd = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, np.ndarray):
            raise CheckpointError(f"{source}: state-dict entry {k!r} is "
                                  f"{type(v).__name__}, expected a tensor")
        sd[k[len("module."):] if k.startswith("module.") else k] = v
    return sd


def infer_arch(sd: Mapping[str, np.ndarray], source: str) -> Arch:
    """Reads depth, width, reduction_dim and corr_dim off an official state dict."""
    blocks = []
    for stage in range(1, 5):
        ids = [int(m.group(1)) for k in sd
               if (m := re.match(rf"^encoder_q\.s{stage}\.b(\d+)\.", k))]
        blocks.append(max(ids) if ids else 0)
    if not any(blocks):
        raise CheckpointError(f"{source}: no 'encoder_q.s*.b*' keys; this is not a CVNet "
                              f"checkpoint (first keys: {', '.join(list(sd)[:5])})")
    try:
        depth = depth_from_stage_blocks(tuple(blocks))
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None

    def dim(key, axis, default):
        return int(sd[key].shape[axis]) if key in sd and sd[key].ndim > axis else default

    try:
        return Arch(depth=depth, width=dim("encoder_q.stem.conv.weight", 0, 64),
                    reduction_dim=dim("encoder_q.head.fc.weight", 0, 2048),
                    corr_dim=dim("conv2ds.0.weight", 0, 256))
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _summary(items, limit=12) -> str:
    """Comma list of keys in natural order; long lists are grouped by their block
    (`encoder_q.s3.b7.* (15 keys)`) so that e.g. a depth mismatch reads at a glance."""
    items = sorted(items, key=_natural)
    if len(items) > limit:
        groups: dict[str, int] = {}
        for k in items:
            prefix = ".".join(k.split(".")[:3])
            groups[prefix] = groups.get(prefix, 0) + 1
        items = [f"{p}.* ({n} keys)" if n > 1 else p for p, n in groups.items()]
    text = ", ".join(items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def check_shapes(got: Mapping[str, tuple], expected: Mapping[str, tuple], source: str,
                 arch: Arch) -> None:
    """Raises one CheckpointError listing missing, unexpected and mis-shaped keys."""
    missing = set(expected) - set(got)
    unexpected = set(got) - set(expected)
    misshaped = [f"{k} {tuple(got[k])} (expected {tuple(expected[k])})"
                 for k in sorted(set(got) & set(expected)) if tuple(got[k]) != tuple(expected[k])]
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source} does not fit {arch}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_summary(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_summary(unexpected)}")
    if misshaped:
        lines.append(f"  mis-shaped keys ({len(misshaped)}): {_summary(misshaped)}")
    raise CheckpointError("\n".join(lines))


def check_state_dict(sd: Mapping[str, np.ndarray], expected: Mapping[str, tuple],
                     source: str, arch: Arch) -> None:
    """`check_shapes` for an official state dict; BatchNorm `num_batches_tracked` entries
    are optional and ignored."""
    norm_modules = {k.rsplit(".", 1)[0] for k in expected if k.endswith(".running_mean")}
    got = {k: tuple(v.shape) for k, v in sd.items()
           if not (k.endswith(".num_batches_tracked") and k.rsplit(".", 1)[0] in norm_modules)}
    check_shapes(got, expected, source, arch)


def state_dict_to_variables(sd: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """Nested {'params': ..., 'batch_stats': ...} of float32 NumPy arrays in Flax layout."""
    variables: dict[str, dict] = {}
    for key, value in sd.items():
        mapped = torch_to_flax(key, value)
        if mapped is None:
            continue
        collection, path, array = mapped
        node = variables.setdefault(collection, {})
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.ascontiguousarray(array, dtype=np.float32)
    return variables


def variables_to_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables -> official state dict (NumPy, PyTorch layouts), e.g. to share trained
    weights with the official code. BatchNorm `num_batches_tracked` is written as 0."""
    sd = {}
    for collection, tree in variables.items():
        for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            path = tuple(str(k.key) for k in kp)
            arr = np.asarray(leaf, np.float32)
            key, _ = flax_to_torch(collection, path, arr.shape)
            if path[-1] == "kernel":
                arr = np.transpose(arr, (3, 2, 0, 1)) if arr.ndim == 4 else arr.T
            sd[key] = np.ascontiguousarray(arr)
            if collection == "batch_stats" and path[-1] == "mean":
                sd[key.replace(".running_mean", ".num_batches_tracked")] = np.zeros((), np.int64)
    return sd


__all__ = ["torch_to_flax", "flax_to_torch",
           "expected_state_dict_shapes", "strip_wrappers", "infer_arch", "check_shapes",
           "check_state_dict",
           "state_dict_to_variables", "variables_to_state_dict"]
