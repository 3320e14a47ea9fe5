"""The project's model directory: `config.json` (architecture, provenance) and `state/`,
an orbax checkpoint of the Flax variables {'params', 'batch_stats'}.

Written atomically (into a hidden sibling, then renamed), read back without executing
anything (JSON + orbax/tensorstore, no pickle), and checked key by key and shape by shape
against the architecture in the config, since orbax itself would restore a mis-shaped array.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from scvnet_jax.convert.mapping import ARCH_FIELDS, check_shapes, expected_state_dict_shapes
from scvnet_jax.convert.torch_file import CheckpointError
from scvnet_jax.models.cvnet import abstract_variables

FORMAT = "scvnet_jax.model"
VERSION = 1
CONFIG = "config.json"
STATE = "state"


def is_model_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def save_model_dir(out_dir, arch: Mapping[str, int], variables: Mapping[str, Any], *,
                   meta: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Writes `variables` and `arch` to `out_dir`; refuses a non-empty `out_dir` unless
    `overwrite`. Nothing appears at `out_dir` until the write is complete."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty (pass overwrite=True / "
                              "--overwrite to replace it)")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        host = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(variables))
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / STATE, host)
        ckptr.wait_until_finished()
        config = {"format": FORMAT, "version": VERSION,
                  "arch": {k: int(arch[k]) for k in ARCH_FIELDS}, "meta": dict(meta or {})}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_config(path) -> dict:
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
    arch = cfg.get("arch")
    if not isinstance(arch, dict) or not all(isinstance(arch.get(k), int) for k in ARCH_FIELDS):
        raise CheckpointError(f"{cfg_path}: 'arch' must hold the integers "
                              f"{', '.join(ARCH_FIELDS)}")
    return cfg


def load_model_dir(path, *, depth: int | None = None):
    """(arch, variables as NumPy) from a model directory; `depth`, if given, must match."""
    import orbax.checkpoint as ocp

    path = Path(path).resolve()
    cfg = read_config(path)
    arch = {k: cfg["arch"][k] for k in ARCH_FIELDS}
    if depth is not None and int(depth) != arch["depth"]:
        raise CheckpointError(f"{path}: holds a ResNet-{arch['depth']} CVNet, but depth "
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
    expected = expected_state_dict_shapes(abstract_variables(arch))
    check_shapes(expected_state_dict_shapes(variables), expected, str(path), arch)
    return arch, jax.tree.map(lambda x: np.asarray(x, np.float32), variables)
