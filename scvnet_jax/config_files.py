"""Config files are Python files with `get_config()` (big_vision style); this loads one by
path, for the benchmarks and tests. (The entry points go through ml_collections'
config_flags, which does the same and adds --config.x overrides; configs that build on
another import it from `scvnet_jax.configs`.)"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def load_module(path) -> ModuleType:
    """Executes the Python file at `path` as a module of its own."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(path, *args, **kwargs):
    """`get_config(*args, **kwargs)` of the config file at `path`."""
    return load_module(path).get_config(*args, **kwargs)
