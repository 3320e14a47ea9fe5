"""scvnet_jax: CVNet and SuperGlobal landmark retrieval in JAX/Flax.

    import scvnet_jax as sj
    model = sj.load("CVPR2022_CVNet_R50.pyth")      # or a converted model directory
    d = model.global_descriptor(images)              # (B, 2048), L2-normalised

Layers, each importing only those before it: `models` (Flax modules, `Arch`) ->
`convert` (checkpoints) -> `api` (`load`, `RetrievalModel`) -> `engine` (extraction and
search on every device) -> `rerank`, `metrics`, `evaluation`, `search`, `training` ->
the command lines (`cli`, the entry points `eval`, `train`, and the app, `app`). No module
of the package imports this facade; import-linter checks the layers (pyproject.toml,
tests/test_layers.py). `errors` holds the one error family, `files` atomic writes,
`images` image reading, `compilation_cache` the persistent XLA cache.

The names below are imported on first use, so `import scvnet_jax` (and the command lines'
checks of their flags and configs) do not wait for JAX and Flax to load. Neither importing
the package nor loading a model changes JAX's configuration; `sj.enable_compilation_cache()`
keeps compiled programs on disk for later processes, as the command lines do.
"""
from __future__ import annotations

import importlib

from scvnet_jax.errors import CheckpointError, ConfigError, InputError, ScvnetError

__version__ = "0.1.0"

_SUBMODULES = ("data", "engine", "mesh", "metrics", "models", "rerank", "search")
_NAMES = {"load": "scvnet_jax.api", "create": "scvnet_jax.api",
          "demo_model_path": "scvnet_jax.api", "RetrievalModel": "scvnet_jax.api",
          "enable_compilation_cache": "scvnet_jax.api",
          "Arch": "scvnet_jax.models.arch"}
__all__ = ["load", "create", "demo_model_path", "RetrievalModel", "Arch",
           "enable_compilation_cache", "ScvnetError",
           "CheckpointError", "InputError", "ConfigError", *_SUBMODULES, "__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"scvnet_jax.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'scvnet_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
