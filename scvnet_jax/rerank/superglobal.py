"""SuperGlobal reranking: MDescAug (top-M descriptor augmentation) then RerankwMDA.

For each query, the top-M database descriptors are each replaced by a weighted average of
themselves and their K nearest neighbours among the top-M (weights 1 and beta * similarity);
the top-M are re-sorted by their similarity to the query; the query is expanded with the
element-wise max of its K+1 best augmented neighbours, and every top-M item is scored by
(similarity to the query + similarity to that expanded query) / 2. Items below M keep
their order. Runs as one jitted program on the accelerator, batched over queries.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from scvnet_jax.errors import InputError


def _desc_sort(x, axis=-1):
    """Indices that sort `x` in descending order; ties keep index order."""
    return jnp.argsort(-x, axis=axis, stable=True)


@partial(jax.jit, static_argnames=("m", "k", "precision"))
def _rerank_top(X, Q, top, beta, m: int, k: int, precision):
    """Reranked order of the top-m candidates `top` (nq, m) -> (nq, m) database indices."""
    Xt = X[top]                                                   # (nq, m, D)
    sims = jnp.einsum("qad,qbd->qab", Xt, Xt, precision=precision)  # (nq, m, m)
    nn_idx = _desc_sort(sims)[..., :k]                              # (nq, m, k) incl. self
    nn_val = jnp.take_along_axis(sims, nn_idx, axis=-1)
    weights = jnp.concatenate([jnp.ones_like(nn_val[..., :1]), beta * nn_val[..., 1:]], -1)
    neigh = jax.vmap(lambda xt, idx: xt[idx])(Xt, nn_idx)           # (nq, m, k, D)
    x_dba = jnp.sum(neigh * weights[..., None], axis=2) / jnp.sum(weights, -1)[..., None]
    sim_q = jnp.einsum("qd,qmd->qm", Q, x_dba, precision=precision)  # (nq, m)
    order = _desc_sort(sim_q)                                       # MDescAug ranking
    top_dba = jnp.take_along_axis(top, order, axis=1)
    sim_sorted = jnp.take_along_axis(sim_q, order, axis=1)
    x_sorted = jnp.take_along_axis(x_dba, order[..., None], axis=1)  # (nq, m, D)
    q_exp = jnp.max(x_sorted[:, :k], axis=1)                        # (nq, D)
    sim_exp = jnp.einsum("qd,qmd->qm", q_exp, x_sorted, precision=precision)
    score = (sim_sorted + sim_exp) / 2.0
    final = _desc_sort(score)
    return jnp.take_along_axis(top_dba, final, axis=1), jnp.take_along_axis(score, final, 1)


def superglobal(X, Q, ranks, M: int = 400, K: int = 9, beta: float = 0.15,
                precision="highest", return_scores: bool = False):
    """SuperGlobal reranking of `ranks`.

    Args:
      X: (N, D) database descriptors (L2-normalised, as the official test code makes them).
      Q: (nq, D) query descriptors.
      ranks: (N, nq) database indices per query, best first (e.g. argsort(-X @ Q.T, 0)).
      M: how many top candidates are reranked (min(M, N) when the database is smaller).
      K: neighbours used for augmentation and query expansion (plus the item itself).
      beta: weight of neighbours relative to the item itself.
      return_scores: also return the scores the top-M were sorted by.
    Returns:
      (N, nq) int64 reranked indices, as NumPy (the official `RerankwMDA` output); with
      `return_scores`, also (min(M, N), nq) float32: the final score of each of the first
      min(M, N) returned items, (similarity to the query + similarity to the expanded
      query) / 2 of its augmented descriptor, descending.
    """
    X, Q = jnp.asarray(X), jnp.asarray(Q)
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape != (X.shape[0], Q.shape[0]):
        raise InputError(f"ranks must be (N, nq) = ({X.shape[0]}, {Q.shape[0]}), "
                         f"got {ranks.shape}")
    m = min(int(M), X.shape[0])
    k = min(int(K) + 1, m)
    top = jnp.asarray(ranks[:m].T)
    head, score = _rerank_top(X, Q, top, jnp.asarray(beta, X.dtype), m, k, precision)
    out = np.concatenate([np.asarray(head).T.astype(np.int64), ranks[m:].astype(np.int64)], 0)
    return (out, np.asarray(score).T) if return_scores else out
