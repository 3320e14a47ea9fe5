"""The training-free baselines: alpha-weighted query expansion (alpha-QE) and database-side
augmentation (alpha-DBA), as in Radenovic, Tolias & Chum (TPAMI 2019) and the revisited
Oxford/Paris paper's baselines.

  alpha_qe   q' = normalize(q + sum_{i<k} max(q.x_i, 0)^alpha x_i) over the query's top k
             database items x_i, then the whole database is ranked again by x.q'.
  dba        x'_j = normalize(x_j + sum_{i<k} max(x_j.x_i, 0)^alpha x_i) over x_j's k
             nearest *other* database items; queries are then ranked against X'.

k = 0 leaves the query (the database) unchanged; alpha = 0 gives plain average QE (DBA).
Negative similarities get weight 0 (a power of a negative number would flip the sign of
odd powers). Both run on the accelerator through the retrieval engine's exact search
(`engine.search`), so they work on databases that do not fit one device's memory as a
similarity matrix.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from scvnet_jax.engine import search
from scvnet_jax.errors import ConfigError, InputError


def _check(k, alpha, name):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ConfigError(f"{name}: k must be an integer >= 0, got {k!r}")
    if not np.isfinite(alpha) or alpha < 0:
        raise ConfigError(f"{name}: alpha must be a finite number >= 0, got {alpha!r}")


@partial(jax.jit, static_argnames=())
def _expand(base, neigh, alpha):
    """normalize(base + sum_i max(base . neigh_i, 0)^alpha neigh_i): base (n, D), neigh
    (n, k, D) -> (n, D)."""
    sim = jnp.einsum("nd,nkd->nk", base, neigh, precision="highest")
    w = jnp.where(sim > 0, jnp.power(jnp.maximum(sim, 1e-30), alpha), 0.0)
    out = base + jnp.einsum("nk,nkd->nd", w, neigh, precision="highest")
    return out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


def expand_queries(X, Q, ranks, k: int = 2, alpha: float = 3.0) -> np.ndarray:
    """The alpha-QE queries (nq, D) from `ranks` (N, nq), best first."""
    _check(k, alpha, "alpha_qe")
    X, Q = np.asarray(X, np.float32), np.asarray(Q, np.float32)
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != Q.shape[0] or ranks.shape[0] > X.shape[0]:
        raise InputError(f"ranks must be (N, nq) with nq = {Q.shape[0]}, got {ranks.shape}")
    k = min(int(k), ranks.shape[0])
    if k == 0:
        return Q
    neigh = X[ranks[:k].T]                                       # (nq, k, D)
    return np.asarray(_expand(jnp.asarray(Q), jnp.asarray(neigh), jnp.float32(alpha)))


def alpha_qe(X, Q, ranks, k: int = 2, alpha: float = 3.0) -> np.ndarray:
    """alpha-QE re-ranking -> (N, nq) int64 database indices per query, best first.

    Args:
      X: (N, D) database descriptors, L2-normalised.
      Q: (nq, D) query descriptors.
      ranks: (N, nq) (or the first rows of it: any top-n, n >= k) first-stage ranking; only
        its top k per query are used, and the whole database is ranked again.
    """
    return search.rank(X, expand_queries(X, Q, ranks, k, alpha))[1]


def dba(X, k: int = 2, alpha: float = 3.0, *, mesh=None) -> np.ndarray:
    """alpha-DBA of a database -> X' (N, D) float32, L2-normalised: each item plus its k
    nearest other items weighted by similarity^alpha (found by the engine's exact top-k,
    split over the devices of `mesh`)."""
    _check(k, alpha, "dba")
    X = np.asarray(X, np.float32)
    k = min(int(k), X.shape[0] - 1)
    if k <= 0:
        return X
    ids = np.arange(X.shape[0])
    _, idx = search.topk(X, X, k, db_labels=ids, query_labels=ids, mesh=mesh)  # not itself
    out = np.empty_like(X)
    for s in range(0, X.shape[0], 4096):
        e = min(s + 4096, X.shape[0])
        out[s:e] = np.asarray(_expand(jnp.asarray(X[s:e]), jnp.asarray(X[idx[s:e]]),
                                      jnp.float32(alpha)))
    return out
