"""Exact similarity search on the accelerator.

`rank` gives every query's full ranking of the database (what the revisited benchmarks'
mAP needs); `topk` gives the k best database rows per query, optionally excluding those of
the query's own label (the stage-2 hard-negative bank), with the database split over the
devices of a mesh: each device finds its shard's top k, then the shards' candidates are
merged. Similarities are float32 dot products at full precision; ties go to the lower
database index in both.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from scvnet_jax import mesh as mesh_lib


@jax.jit
def _rank(X, Q):
    sim = jnp.matmul(X, Q.T, precision="highest")
    return sim, jnp.argsort(-sim, axis=0, stable=True)


def rank(X, Q) -> tuple[np.ndarray, np.ndarray]:
    """(similarities (N, nq) float32, rankings (N, nq) int64, best first) of queries Q
    (nq, D) against the database X (N, D)."""
    sim, ranks = _rank(jnp.asarray(X, jnp.float32), jnp.asarray(Q, jnp.float32))
    return np.asarray(sim), np.asarray(ranks).astype(np.int64)


@partial(jax.jit, static_argnames=("k", "mesh"))
def _topk(X, valid, xl, Q, ql, k: int, mesh):
    n_local = X.shape[0] // mesh.devices.size

    def shard(x, v, lab, q, qlab):
        sim = jnp.matmul(q, x.T, precision="highest")
        sim = jnp.where(v[None, :] & (qlab[:, None] != lab[None, :]), sim, -jnp.inf)
        vals, idx = jax.lax.top_k(sim, min(k, n_local))
        idx = idx + jax.lax.axis_index(mesh_lib.AXIS) * n_local
        vals = jax.lax.all_gather(vals, mesh_lib.AXIS, axis=1, tiled=True)
        idx = jax.lax.all_gather(idx, mesh_lib.AXIS, axis=1, tiled=True)
        best, pos = jax.lax.top_k(vals, min(k, vals.shape[1]))
        return best, jnp.take_along_axis(idx, pos, axis=1)

    data = P(mesh_lib.AXIS)
    return jax.shard_map(shard, mesh=mesh, in_specs=(data, data, data, P(), P()),
                         out_specs=(P(), P()), check_vma=False)(X, valid, xl, Q, ql)


class Database:
    """A database put on the devices once, split over `mesh` (rows padded to a multiple of
    the device count), for many `topk` calls: `topk(put_database(X), Q, k)`."""

    def __init__(self, X, db_labels=None, mesh=None):
        self.mesh = mesh if mesh is not None else mesh_lib.local_mesh()
        X = np.asarray(X, np.float32)
        self.n, self.dim = X.shape
        xl = (np.full(self.n, -1, np.int64) if db_labels is None
              else np.asarray(db_labels, np.int64))
        pad = -self.n % self.mesh.devices.size
        valid = np.arange(self.n + pad) < self.n
        X = np.concatenate([X, np.zeros((pad, self.dim), np.float32)])
        xl = np.concatenate([xl, np.full(pad, -1, np.int64)])
        shard = NamedSharding(self.mesh, P(mesh_lib.AXIS))
        self.X, self.valid, self.labels = (jax.device_put(a, shard) for a in (X, valid, xl))


def put_database(X, db_labels=None, mesh=None) -> Database:
    return Database(X, db_labels, mesh)


def topk(X, Q, k: int, *, db_labels=None, query_labels=None, mesh=None,
         max_block: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar database rows of each query -> (scores (nq, k) float32, indices
    (nq, k) int64), best first; index -1 (score -inf) where fewer rows qualify.

    X: the database (N, D), or a `Database` already on the devices (then its labels and
    mesh are used). db_labels / query_labels: with both given, a query never gets a row of
    its own label. The database is split over `mesh` (default: this process's devices);
    queries go in blocks of at most `max_block` similarities, all of one compiled shape."""
    db = X if isinstance(X, Database) else Database(X, db_labels, mesh)
    mesh, n = db.mesh, db.n
    Q = np.asarray(Q, np.float32)
    nq = Q.shape[0]
    ql = (np.full(nq, -2, np.int64) if query_labels is None
          else np.asarray(query_labels, np.int64))
    X, valid, xl = db.X, db.valid, db.labels
    k_eff = min(k, n)
    rows = max(1, min(nq, max_block // max(n, 1)))
    scores = np.full((nq, k), -np.inf, np.float32)
    out = np.full((nq, k), -1, np.int64)
    repl = mesh_lib.replicated(mesh)
    for s in range(0, nq, rows):
        q, qlab = Q[s:s + rows], ql[s:s + rows]
        m = len(q)
        if m < rows:                  # one compiled shape for every block
            q = np.concatenate([q, np.zeros((rows - m, Q.shape[1]), np.float32)])
            qlab = np.concatenate([qlab, np.full(rows - m, -2, np.int64)])
        vals, idx = _topk(X, valid, xl, jax.device_put(q, repl), jax.device_put(qlab, repl),
                          k_eff, mesh)
        vals, idx = np.asarray(vals)[:m], np.asarray(idx)[:m]
        scores[s:s + m, :k_eff] = vals
        out[s:s + m, :k_eff] = np.where(np.isfinite(vals), idx, -1)
    return scores, out
