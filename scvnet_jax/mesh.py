"""Devices and processes: the one-axis device mesh that training and retrieval share.

Training runs one program over every device of every process (`make_mesh()`); retrieval
runs independent programs per process over that process's devices (`local_mesh()`), each
process working on its own share of the images, and then gathers the results
(`allgather_rows`). Batches are split along the mesh axis 'data'; weights are replicated,
except a classifier's columns, which are split over the same axis (`state_shardings`: the
stage-1 2048 x 81,313 classifier and its optimiser state would not fit one 16 GB core
replicated). No pmap: `jax.jit` with NamedShardings (flax examples/gemma style).
"""
from __future__ import annotations

import json
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), (AXIS,))


def local_mesh() -> Mesh:
    """A 1-D mesh over this process's devices."""
    return make_mesh(jax.local_devices())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the leading (batch) axis over the mesh."""
    return NamedSharding(mesh, P(AXIS))


def columns_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the last axis (columns) of a 2-D array over the mesh."""
    return NamedSharding(mesh, P(None, AXIS))


# Columns of a sharded matrix are padded to a multiple of lcm(COLUMN_MULTIPLE, devices):
# the same shape on every power-of-two mesh up to 1024 devices, so a run can resume on
# another such mesh.
COLUMN_MULTIPLE = 1024


def padded_columns(columns: int, devices: int) -> int:
    """How many columns a matrix of `columns` columns gets to be split evenly over
    `devices` devices: `columns` itself on one device (nothing changes), else the next
    multiple of lcm(COLUMN_MULTIPLE, devices)."""
    if devices <= 1:
        return columns
    m = math.lcm(COLUMN_MULTIPLE, devices)
    return -(-columns // m) * m


def state_shardings(abstract, mesh: Mesh, split=()):
    """The shardings of a train state (a pytree of arrays or ShapeDtypeStructs): every 2-D
    leaf whose tree path goes through a key named in `split` (stage cvnet_global: 'classifier', so
    the parameters and their mirrors in the optimiser state: momentum, Adam moments) has
    its columns split over the mesh when their number divides evenly; everything else is
    replicated."""
    n = mesh.devices.size
    repl, cols = replicated(mesh), columns_sharding(mesh)

    def rule(path, leaf):
        names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
        shape = getattr(leaf, "shape", ())
        if n > 1 and names & set(split) and len(shape) == 2 and shape[1] % n == 0:
            return cols
        return repl

    return jax.tree_util.tree_map_with_path(rule, abstract)


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """{name: this process's rows} -> {name: global jax.Array} (every process calls it with
    its own slice of the global batch)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def put_batch(tree, mesh: Mesh, batch: int):
    """Places a pytree of host arrays on `mesh` (single process): leaves whose leading axis
    is `batch` are split over the devices when `batch` divides evenly, everything else is
    replicated."""
    n = mesh.devices.size
    split = batch_sharding(mesh) if n > 1 and batch % n == 0 else replicated(mesh)
    repl = replicated(mesh)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        return jax.device_put(x, split if x.ndim and x.shape[0] == batch else repl)

    return jax.tree.map(put, tree)


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def owner(i: int) -> int:
    """The process that handles work item `i` (round robin)."""
    return i % jax.process_count()


def allgather_rows(rows: np.ndarray) -> np.ndarray:
    """Concatenates every process's `rows` (any number of rows each, same trailing shape and
    dtype) in process order; with one process, `rows` itself."""
    rows = np.asarray(rows)
    if jax.process_count() == 1:
        return rows
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.int64(rows.shape[0]))).reshape(-1)
    if counts.max() == 0:
        return rows
    padded = np.zeros((int(counts.max()),) + rows.shape[1:], rows.dtype)
    padded[:rows.shape[0]] = rows
    every = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([every[p, :int(c)] for p, c in enumerate(counts)])


def allgather_json(value) -> list:
    """Every process's `value` (anything JSON can encode), in process order; with one
    process, [value]."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = allgather_rows(np.array([data.size], np.int64))
    data, out, at = allgather_rows(data), [], 0
    for size in sizes:
        out.append(json.loads(data[at:at + int(size)].tobytes()))
        at += int(size)
    return out


def barrier(name: str) -> None:
    """Waits until every process got here (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
