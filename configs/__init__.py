"""Configs (big_vision style): each file's get_config() returns an ml_collections
ConfigDict and its docstring gives the exact command, the hardware, the time and the
result. Shipped with the package as `scvnet_jax.configs`, so the entry points find them by
name from any directory (`python -m scvnet_jax.train --config demo.py:tiny`)."""
