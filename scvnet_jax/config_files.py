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


def field(cfg, name: str):
    """cfg["a"]["b"] for name "a.b"."""
    node = cfg
    for part in name.split("."):
        node = node[part]
    return node


def check_fields(cfg, ranges, choices=()) -> None:
    """One ConfigError naming the first field out of range or not among its choices.

    ranges: (name, "int" | "num", test, what is expected); choices: (name, allowed values)."""
    from scvnet_jax.errors import ConfigError

    for name, kind, ok, expected in ranges:
        v = field(cfg, name)
        number = not isinstance(v, bool) and isinstance(v, (int, float))
        if not number or (kind == "int" and not float(v).is_integer()) or not ok(v):
            raise ConfigError(f"config.{name} = {v!r}: expected {expected}")
    for name, allowed in choices:
        v = field(cfg, name)
        if v not in allowed:
            raise ConfigError(f"config.{name} = {v!r}: expected one of "
                              f"{', '.join(repr(c) for c in allowed)}")
