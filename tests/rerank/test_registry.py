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


def test_a_result_has_one_type_of_ranks(monkeypatch):
    """Every reranker's Result.ranks is one (N, nq) int64 array, best first; a protocol that
    ranks each revisitop setting apart (cvnet's "official") adds them in per_setting, its
    ranks being the Medium one; and the shape checks are the package's InputError."""
    import scvnet_jax as sj
    from scvnet_jax.engine import search, verify

    rng = np.random.default_rng(0)
    X, Q = _unit(rng.normal(size=(12, 8))), _unit(rng.normal(size=(3, 8)))
    ranks = search.rank(X, Q)[1]
    small = {"superglobal": {"M": 6, "K": 2}, "icfrr": {"KG": 4, "KQ": 4},
             "alpha_qe": {}, "dba": {}}
    for name, opts in small.items():
        out = registry.rerank(name, registry.Inputs(X, Q, ranks), **opts)
        assert type(out.ranks) is np.ndarray and out.ranks.dtype == np.int64, name
        assert out.ranks.shape == (12, 3) and out.per_setting == {}, name
        assert out.scores.dtype == np.float32, name

    monkeypatch.setattr(verify, "verification_scores", lambda *a, **k: rng.uniform(
        size=(12, 3)).astype(np.float32))      # the verifier, without a model or images
    gnd = [{"easy": [int(ranks[1, q])], "hard": [int(ranks[3, q])],
            "junk": [int(ranks[0, q])]} for q in range(3)]
    out = registry.rerank("cvnet", registry.Inputs(X, Q, ranks, model=object(),
                                                   query_images=[], db_images=[], gnd=gnd),
                          topk=5, protocol="official")
    assert type(out.ranks) is np.ndarray and out.ranks.dtype == np.int64
    assert set(out.per_setting) == {"E", "M", "H"} and out.protocol == "official"
    np.testing.assert_array_equal(out.ranks, out.per_setting["M"])
    assert all(r.dtype == np.int64 and r.shape == (12, 3) for r in out.per_setting.values())

    with pytest.raises(sj.InputError, match="ranks must be"):
        sj.rerank.superglobal(X, Q, ranks[:, :2])
    with pytest.raises(sj.InputError, match="ranks must be"):
        sj.rerank.alpha_qe(X, Q, ranks[:, :2])
