"""Reading a reranker's weights, for every reranker with a model of its own (CSA, AMES): a
model directory we wrote (`save_model_dir`, with its kind and meta), or an official PyTorch
checkpoint read without torch through the restricted unpickler, its state dict checked key
by key and shape by shape against the architecture read off it (one grouped error).

    arch, variables, meta = read_model_dir(path, "ames")
    sd, source = official_state_dict(path, "AMES", "state", "{'state': state_dict}")
    arch, variables = variables_from_state_dict(lambda: AMESArch(...), sd, source,
                                                abstract_variables)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from scvnet_jax.errors import CheckpointError


def read_model_dir(path, kind: str) -> tuple[Any, dict, dict]:
    """(arch, variables, meta) of a model directory of `kind` ("csa", "ames")."""
    from scvnet_jax.convert.model_dir import load_model_dir, read_config
    arch, variables = load_model_dir(path, kind=kind)
    meta = dict(read_config(Path(path).resolve(), kind).get("meta") or {})
    return arch, variables, meta


def official_state_dict(path, name: str, state_key: str, layout: str) -> tuple[dict, str]:
    """(state dict {name: NumPy array} without DataParallel's "module." prefixes, source)
    of an official checkpoint of model `name`: `torch.save` of a dict holding it under
    `state_key` (`layout` says so in errors), or of the state dict itself."""
    from scvnet_jax.convert.torch_file import load_torch_file
    if Path(path).is_dir():
        raise CheckpointError(f"{path}: a directory without config.json; expected an official "
                              f"{name} checkpoint or a model directory written by scvnet_jax")
    source = os.fspath(path)
    obj = load_torch_file(source)
    if isinstance(obj, Mapping) and state_key in obj:
        obj = obj[state_key]
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise CheckpointError(f"{source}: expected {layout} or a state dict of tensors")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    return sd, source


def not_a_state_dict(source: str, name: str, err: Exception, sd: Mapping) -> CheckpointError:
    """The error for a state dict that lacks what model `name`'s architecture is read off."""
    return CheckpointError(f"{source}: not a{'n' if name[0] in 'AEIOU' else ''} {name} state "
                           f"dict (no {err} among {', '.join(list(sd)[:5])}, ...)")


def variables_from_state_dict(make_arch: Callable[[], Any], state_dict: Mapping, source: str,
                              abstract_variables: Callable[[Any], dict]) -> tuple[Any, dict]:
    """(arch, Flax variables) of an official state dict (PyTorch layouts): `make_arch()`'s
    errors and every missing, unexpected or misshapen key are one CheckpointError naming
    `source`."""
    from scvnet_jax.convert import mapping
    try:
        arch = make_arch()
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    expected = mapping.expected_state_dict_shapes(abstract_variables(arch))
    mapping.check_shapes({k: tuple(v.shape) for k, v in sd.items()}, expected, source, arch)
    return arch, mapping.state_dict_to_variables(sd)
