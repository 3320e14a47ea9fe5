"""The project's model directory: `config.json` (architecture, provenance) and `state/`,
an orbax checkpoint of the Flax variables ({'params', 'batch_stats'} of a CVNet,
{'params'} of a CSA or AMES reranker). `config.json` names the kind of model ("kind":
"cvnet", "csa" or "ames"; directories without it are CVNets) and its architecture.

Written atomically (into a hidden sibling, then renamed), read back without executing
anything (JSON + orbax/tensorstore, no pickle), and checked key by key and shape by shape
against the architecture in the config, since orbax itself would restore a mis-shaped array.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from scvnet_jax import files
from scvnet_jax.convert.mapping import check_shapes, expected_state_dict_shapes
from scvnet_jax.errors import CheckpointError
from scvnet_jax.models.arch import Arch

FORMAT = "scvnet_jax.model"
VERSION = 1
CONFIG = "config.json"
STATE = "state"


def _kinds() -> dict:
    """kind -> (architecture type, its abstract variables)."""
    from scvnet_jax.models import ames, csa, cvnet
    return {"cvnet": (Arch, cvnet.abstract_variables),
            "csa": (csa.CSAArch, csa.abstract_variables),
            "ames": (ames.AMESArch, ames.abstract_variables)}


def kind_of(arch) -> str:
    return getattr(arch, "kind", "cvnet")


def is_model_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def _is_ours(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_model_dir(out_dir, arch: Arch, variables: Mapping[str, Any], *,
                   meta: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Writes `variables` and `arch` to `out_dir`. An existing non-empty `out_dir` is
    replaced only with `overwrite` and only if it is a model directory we wrote and holds
    nothing else (config.json and state/): nothing else is ever deleted. Nothing appears
    at `out_dir` until the write is complete."""
    import orbax.checkpoint as ocp

    arch = arch if hasattr(arch, "asdict") else Arch.from_mapping(arch)
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise CheckpointError(f"{out} already exists and is not empty (pass "
                                  "overwrite=True / --overwrite to replace a model directory)")
        if not _is_ours(out):
            raise CheckpointError(f"{out} exists and is not a scvnet_jax model directory; "
                                  "refusing to replace it (choose another output path)")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in (CONFIG, STATE))
        if foreign:
            names = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise CheckpointError(f"{out} holds files that are not part of a model directory "
                                  f"({names}); refusing to replace it (move them or choose "
                                  "another output path)")
    tmp = files.staging_dir(out)
    try:
        host = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(variables))
        # host NumPy arrays, written by this process alone: in a multi-process run only
        # process 0 exports, and orbax's default would wait for the others at a barrier
        me = jax.process_index()
        alone = ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"export{me}")
        ckptr = ocp.StandardCheckpointer(multiprocessing_options=alone)
        ckptr.save(tmp / STATE, host)
        ckptr.wait_until_finished()
        config = {"format": FORMAT, "version": VERSION, "kind": kind_of(arch),
                  "arch": arch.asdict(), "meta": dict(meta or {})}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        files.replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_config(path, kind: str | None = "cvnet") -> dict:
    """The model directory's config.json, checked; `cfg["arch"]` is an `Arch` (a CSAArch
    for kind "csa", an AMESArch for kind "ames"). `kind`: the kind of model expected (None: any)."""
    cfg_path = Path(path) / CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read the model config ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not a scvnet_jax model directory (expected "
                              f"\"format\": \"{FORMAT}\")")
    if cfg.get("version") != VERSION:
        raise CheckpointError(f"{cfg_path}: model format version {cfg.get('version')!r}, this "
                              f"scvnet_jax reads version {VERSION}")
    got = cfg.setdefault("kind", "cvnet")
    kinds = _kinds()
    if got not in kinds:
        raise CheckpointError(f"{cfg_path}: unknown kind of model {got!r} (known: "
                              f"{', '.join(kinds)})")
    if kind is not None and got != kind:
        raise CheckpointError(f"{path}: holds a {got} model, not a {kind} model")
    arch = cfg.get("arch")
    if got == "cvnet":
        try:
            if not isinstance(arch, dict) or not all(type(arch.get(k)) is int
                                                     for k in Arch.FIELDS):
                raise ValueError("not integers")
            cfg["arch"] = Arch.from_mapping(arch)
        except ValueError as e:
            raise CheckpointError(f"{cfg_path}: 'arch' must hold the positive integers "
                                  f"{', '.join(Arch.FIELDS)} of a supported CVNet ({e})") from None
        return cfg
    arch_type = kinds[got][0]
    try:
        if not isinstance(arch, dict):
            raise ValueError("not a mapping")
        cfg["arch"] = arch_type.from_mapping(arch)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: 'arch' must hold {', '.join(arch_type.FIELDS)} "
                              f"({e})") from None
    return cfg


def load_model_dir(path, *, depth: int | None = None, kind: str = "cvnet") -> tuple[Any, dict]:
    """(arch, variables as NumPy) from a model directory of that kind; `depth`, if given,
    must match (CVNet)."""
    import orbax.checkpoint as ocp

    path = Path(path).resolve()
    arch = read_config(path, kind)["arch"]
    if depth is not None and int(depth) != arch.depth:
        raise CheckpointError(f"{path}: holds a ResNet-{arch.depth} CVNet, but depth "
                              f"{depth} was asked for")
    state = path / STATE
    if not state.is_dir():
        raise CheckpointError(f"{state}: missing (a model directory holds config.json and "
                              "state/)")
    try:
        variables = ocp.StandardCheckpointer().restore(state)
    except Exception as e:  # orbax/tensorstore raise many kinds
        raise CheckpointError(f"{state}: cannot restore the orbax checkpoint "
                              f"({type(e).__name__}: {str(e)[:300]})") from None
    expected = expected_state_dict_shapes(_kinds()[kind][1](arch))
    check_shapes(expected_state_dict_shapes(variables), expected, str(path), arch)
    return arch, jax.tree.map(lambda x: np.asarray(x, np.float32), variables)
