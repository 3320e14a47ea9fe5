"""alpha-QE and alpha-DBA against a direct NumPy computation of their definitions."""
from __future__ import annotations

import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax.errors import ConfigError


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = _unit(rng.normal(size=(6, 16)))
    X = _unit(centres[rng.integers(0, 6, 60)] + 0.6 * rng.normal(size=(60, 16))).astype(
        np.float32)
    Q = _unit(centres[:4] + 0.6 * rng.normal(size=(4, 16))).astype(np.float32)
    return X, Q, np.argsort(-(X @ Q.T), axis=0, kind="stable")


def _weighted(base, neigh, alpha):
    s = np.einsum("d,kd->k", base, neigh)
    w = np.where(s > 0, np.maximum(s, 0) ** alpha, 0.0)
    out = base + w @ neigh
    return out / np.linalg.norm(out)


@pytest.mark.parametrize("k,alpha", [(1, 3.0), (3, 3.0), (5, 0.0)])
def test_alpha_qe_is_its_definition(data, k, alpha):
    X, Q, ranks = data
    want_q = np.stack([_weighted(Q[i].astype(np.float64), X[ranks[:k, i]].astype(np.float64),
                                 alpha) for i in range(len(Q))])
    np.testing.assert_allclose(sj.rerank.expansion.expand_queries(X, Q, ranks, k, alpha),
                               want_q, atol=2e-6)
    got = sj.rerank.alpha_qe(X, Q, ranks, k=k, alpha=alpha)
    sim = X.astype(np.float64) @ want_q.T
    # sorted by the expanded similarity (ties are 1e-6 apart at the very least here)
    assert got.shape == ranks.shape and got.dtype == np.int64
    assert np.all(np.diff(np.take_along_axis(sim, got, 0), axis=0) <= 1e-6)
    # only the top k were used: the rest of the first stage does not matter
    np.testing.assert_array_equal(sj.rerank.alpha_qe(X, Q, ranks[:k], k=k, alpha=alpha), got)


def test_k_zero_changes_nothing(data):
    X, Q, ranks = data
    np.testing.assert_array_equal(sj.rerank.alpha_qe(X, Q, ranks, k=0), ranks)
    np.testing.assert_array_equal(sj.rerank.dba(X, k=0), X)


@pytest.mark.parametrize("k,alpha", [(2, 3.0), (4, 1.0)])
def test_dba_is_its_definition(data, k, alpha):
    X, _, _ = data
    S = X.astype(np.float64) @ X.T.astype(np.float64)
    np.fill_diagonal(S, -np.inf)                       # never its own neighbour
    want = np.stack([_weighted(X[j].astype(np.float64), X[np.argsort(-S[j], kind="stable")[:k]]
                               .astype(np.float64), alpha) for j in range(len(X))])
    np.testing.assert_allclose(sj.rerank.dba(X, k=k, alpha=alpha), want, atol=2e-6)


def test_bad_settings_are_refused(data):
    X, Q, ranks = data
    with pytest.raises(ConfigError, match="k must be"):
        sj.rerank.alpha_qe(X, Q, ranks, k=-1)
    with pytest.raises(ConfigError, match="alpha must be"):
        sj.rerank.dba(X, k=2, alpha=float("nan"))
