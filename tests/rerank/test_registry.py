"""The one registry of rerankers: names, options and their checks, and a first stage from
elsewhere (`from_candidates`)."""
from __future__ import annotations

import numpy as np
import pytest

from scvnet_jax.errors import ConfigError
from scvnet_jax.evaluation.config import RERANK_PIPELINES
from scvnet_jax.rerank import registry


def test_every_reranker_is_registered_once():
    assert registry.names() == ["superglobal", "cvnet", *RERANK_PIPELINES]
    for name in registry.names():
        r = registry.get(name)
        assert r.name == name and r.summary and r.score
    with pytest.raises(ConfigError, match="unknown reranker 'rrt'; choose from superglobal"):
        registry.get("rrt")


def test_options_are_checked():
    assert registry.options("alpha_qe", {"k": 5}) == {"k": 5, "alpha": 3.0}
    with pytest.raises(ConfigError, match="alpha_qe: unknown option 'K'"):
        registry.options("alpha_qe", {"K": 5})
    with pytest.raises(ConfigError, match=r"icfrr: option KG = 2.5, expected an integer >= 1"):
        registry.options("icfrr", {"KG": 2.5})
    with pytest.raises(ConfigError, match="dba: option alpha = nan"):
        registry.options("dba", {"alpha": float("nan")})
    with pytest.raises(ConfigError, match="icfrr: option limited_memory = 1, expected a bool"):
        registry.options("icfrr", {"limited_memory": 1})


def _unit(a):
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def test_from_candidates_keeps_the_given_order_and_maps_back():
    rng = np.random.default_rng(0)
    store = {f"id{i}": _unit(rng.normal(size=8)) for i in range(30)}
    Q = _unit(rng.normal(size=(3, 8)))
    hits = np.array([["id3", "id7", "id1", "id9"], ["id7", "id2", "id3", "id4"],
                     ["id0", "id5", "id6", "id8"]])
    inputs, ids = registry.from_candidates(Q, hits, store)
    assert sorted(ids) == sorted(set(hits.ravel())) and inputs.X.shape == (len(ids), 8)
    for q in range(3):
        assert list(ids[inputs.ranks[:4, q]]) == list(hits[q])           # given order first
        rest = inputs.ranks[4:, q]
        assert np.all(np.diff(inputs.sim[rest, q]) <= 0)                  # then by similarity
        np.testing.assert_allclose(inputs.X[inputs.ranks[0, q]], store[hits[q, 0]])
    out = registry.rerank("alpha_qe", inputs, k=2, alpha=1.0)
    assert sorted(ids[out.ranks[:, 0]]) == sorted(ids)
    # a callable gives the same inputs
    again, ids2 = registry.from_candidates(Q, hits, lambda xs: np.stack([store[i] for i in xs]))
    np.testing.assert_array_equal(again.ranks, inputs.ranks)
    assert list(ids2) == list(ids)
    with pytest.raises(ConfigError, match="no descriptor for candidate ids"):
        registry.from_candidates(Q, hits, {k: v for k, v in store.items() if k != "id5"})
    with pytest.raises(ConfigError, match="candidate_ids must be"):
        registry.from_candidates(Q, hits[:2], store)


def test_the_registry_is_reachable_from_the_package():
    """`sj.rerank.registry` (as the docs write it) in a fresh process after `import
    scvnet_jax` alone (issue 35: an AttributeError, the submodule was never imported)."""
    import subprocess
    import sys
    code = ("import scvnet_jax as sj\n"
            "print(' '.join(sj.rerank.registry.names()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(r.stdout.split()) == set(registry.names())
