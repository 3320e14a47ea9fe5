"""Official PyTorch CVNet checkpoints -> Flax variables, without torch.

    python -m scvnet_jax.convert CVPR2022_CVNet_R50.pyth converted/cvnet_r50

reads a `.pyth`/`.pth` file (zip or legacy `torch.save` format; `{"model_state": sd}` or a
bare state dict), detects the depth, checks every key and shape, and writes a model
directory (orbax checkpoint + config.json) that `scvnet_jax.load` reads back.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from scvnet_jax.convert import mapping
from scvnet_jax.convert.model_dir import (is_model_dir, load_model_dir, read_config,
                                         save_model_dir)
from scvnet_jax.convert.torch_file import load_torch_file
from scvnet_jax.errors import CheckpointError, ScvnetError
from scvnet_jax.models.arch import Arch
from scvnet_jax.models.cvnet import CVNet, abstract_variables, resolve_precision

__all__ = ["CheckpointError", "load_torch_file", "read_official", "read_checkpoint", "load",
           "convert", "save_model_dir", "load_model_dir", "read_config", "main"]


def read_official(path, *, depth: int | None = None) -> tuple[Arch, dict]:
    """(arch, variables) from an official PyTorch checkpoint file.

    The architecture is read off the state dict; `depth`, if given, overrides the detected
    depth, so an R50 file asked to load as R101 fails with the list of missing keys.
    """
    import dataclasses

    source = os.fspath(path)
    sd = mapping.strip_wrappers(load_torch_file(source), source)
    arch = mapping.infer_arch(sd, source)
    if depth is not None:
        try:
            arch = dataclasses.replace(arch, depth=int(depth))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    expected = mapping.expected_state_dict_shapes(abstract_variables(arch))
    mapping.check_state_dict(sd, expected, source, arch)
    return arch, mapping.state_dict_to_variables(sd)


def read_checkpoint(path, *, depth: int | None = None) -> tuple[Arch, dict]:
    """(arch, variables) from an official checkpoint file, a converted model directory, or
    a training run's checkpoint step `W/checkpoints/<step>` (stages 1 and 2)."""
    if is_model_dir(path):
        return load_model_dir(path, depth=depth)
    from scvnet_jax.training import checkpoints
    if checkpoints.is_run_checkpoint(path):
        arch, variables = checkpoints.read_model(path)
        if depth is not None and int(depth) != arch.depth:
            raise CheckpointError(f"{path}: holds a ResNet-{arch.depth} CVNet, but depth "
                                  f"{depth} was asked for")
        return arch, variables
    if Path(path).is_dir():
        raise CheckpointError(f"{path}: a directory without config.json; expected a "
                              "directory written by `python -m scvnet_jax.convert`")
    return read_official(path, depth=depth)


def load(path, *, depth: int | None = None, dtype=None, precision="auto"):
    """big_vision-style loader: (CVNet module, variables) from an official `.pyth`/`.pth`
    checkpoint or a model directory (written by the converter or train.py).

    precision "auto" means float32-exact matmuls/convs ("highest") for float32 models (so
    GPUs/TPUs match the official outputs) and the backend default for other dtypes.
    """
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    arch, variables = read_checkpoint(path, depth=depth)
    return CVNet(arch, dtype=dtype, precision=resolve_precision(dtype, precision)), variables


def convert(in_path, out_dir, *, depth: int | None = None, overwrite: bool = False) -> Path:
    """Converts an official checkpoint into a model directory; returns its path."""
    arch, variables = read_official(in_path, depth=depth)
    meta = {"source": os.path.basename(os.fspath(in_path)),
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return save_model_dir(out_dir, arch, variables, meta=meta, overwrite=overwrite)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scvnet_jax.convert",
        description="Convert an official CVNet PyTorch checkpoint (.pyth/.pth, zip or legacy "
                    "format) into a scvnet_jax model directory (orbax checkpoint + "
                    "config.json). torch is not needed and no code from the file is run.")
    parser.add_argument("input", help="official checkpoint, e.g. CVPR2022_CVNet_R50.pyth")
    parser.add_argument("output", help="model directory to create")
    parser.add_argument("--depth", type=int, choices=(50, 101, 152), default=None,
                        help="expected ResNet depth (default: detected from the checkpoint)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT if it is an existing model directory")
    args = parser.parse_args(argv)
    try:
        out = convert(args.input, args.output, depth=args.depth, overwrite=args.overwrite)
    except ScvnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {out}: {read_config(out)['arch']}")
    return 0
