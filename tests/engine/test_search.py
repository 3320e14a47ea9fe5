"""Exact search: full rankings and top-k (with label exclusion) against NumPy."""
from __future__ import annotations

import numpy as np

from scvnet_jax.engine import search


def _data(n=37, nq=5, d=8, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, X[:nq] + 0.1 * rng.normal(size=(nq, d)).astype(np.float32)


def test_rank_matches_numpy_and_breaks_ties_by_index():
    X, Q = _data()
    X[7] = X[3]                                         # a tie: 3 must come before 7
    sim, ranks = search.rank(X, Q)
    want = X.astype(np.float64) @ Q.T.astype(np.float64)
    np.testing.assert_allclose(sim, want, atol=1e-6)
    for i in range(len(Q)):
        order = list(ranks[:, i])
        assert order.index(3) < order.index(7)
        assert np.all(np.diff(want[ranks[:, i], i]) <= 1e-6)
    assert ranks.dtype == np.int64 and ranks.shape == (37, 5)


def test_topk_with_and_without_labels():
    X, Q = _data()
    scores, idx = search.topk(X, Q, 6)
    _, ranks = search.rank(X, Q)
    np.testing.assert_array_equal(idx, ranks[:6].T)
    np.testing.assert_allclose(scores, np.take_along_axis(X @ Q.T, ranks[:6], 0).T, atol=1e-6)
    labels = np.arange(37) % 4
    ql = np.array([0, 1, 2, 3, 0])
    _, idx = search.topk(X, Q, 40, db_labels=labels, query_labels=ql, max_block=2 * 37)
    for i in range(5):
        keep = [j for j in ranks[:, i] if labels[j] != ql[i]]
        np.testing.assert_array_equal(idx[i, :len(keep)], keep)
        assert (idx[i, len(keep):] == -1).all()
