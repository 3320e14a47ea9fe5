"""scvnet_jax: CVNet and SuperGlobal landmark retrieval in JAX/Flax.

    import scvnet_jax as sj
    model = sj.load("CVPR2022_CVNet_R50.pyth")      # or a converted model directory
    d = model.global_descriptor(images)              # (B, 2048), L2-normalised

Layers, each importing only those before it: `models` (Flax modules, `Arch`) ->
`convert` (checkpoints) -> `api` (`load`, `RetrievalModel`) -> `engine` (extraction and
search on every device) -> `rerank`, `metrics`, `evaluation`, `search`, `training` ->
the entry points `eval`, `train`. `errors` holds the one error type, `files` atomic
writes, `images` image reading.

The names below are imported on first use, so `import scvnet_jax` (and the command lines'
checks of their flags and configs) do not wait for JAX and Flax to load.
"""
from __future__ import annotations

import importlib

from scvnet_jax.errors import CheckpointError, ConfigError, InputError, ScvnetError

__version__ = "0.1.0"

_SUBMODULES = ("data", "engine", "mesh", "metrics", "models", "rerank", "search")
_NAMES = {"load": "scvnet_jax.api", "create": "scvnet_jax.api",
          "demo_model_path": "scvnet_jax.api", "RetrievalModel": "scvnet_jax.api",
          "Arch": "scvnet_jax.models.arch"}
__all__ = ["load", "create", "demo_model_path", "RetrievalModel", "Arch", "ScvnetError",
           "CheckpointError", "InputError", "ConfigError", *_SUBMODULES, "__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"scvnet_jax.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'scvnet_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
