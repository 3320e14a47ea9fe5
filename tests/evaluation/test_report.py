"""results.json's per-query and per-class AP (report.per_query_json) against the mAP of the
same pipeline result, for each benchmark protocol."""
from __future__ import annotations

import numpy as np
import pytest

from scvnet_jax import metrics
from scvnet_jax.evaluation import report
from scvnet_jax.evaluation.pipelines import PipelineResult


def _result(protocol, ranks, gnd, classes=None):
    maps, mpk, aps = metrics.score_queries(protocol, ranks, gnd, (1, 5))
    assert (maps, mpk) == metrics.score(protocol, ranks, gnd, (1, 5))
    return PipelineResult("p", "label-free", {"": ranks}, maps, mpk, {}, aps,
                          [f"q{i}" for i in range(ranks.shape[1])], classes)


def _check_means(out, maps):
    for s, m in maps.items():
        aps = [q["AP"][s] for q in out["per_query"] if q["AP"][s] is not None]
        assert np.mean(aps) == pytest.approx(m, rel=1e-12)


def test_per_query_ap_means_are_the_maps():
    rng = np.random.default_rng(0)
    ranks = np.stack([rng.permutation(20) for _ in range(6)], axis=1)
    # revisitop: query 5 has no hard positives (None in H, left out of its mean)
    gnd = [{"easy": rng.choice(20, 3, replace=False), "hard": rng.choice(20, 2, replace=False),
            "junk": np.array([i])} for i in range(6)]
    gnd[5]["hard"] = np.zeros(0, np.int64)
    r = _result("revisitop", ranks, gnd)
    out = report.per_query_json(r)
    assert [q["query"] for q in out["per_query"]] == [f"q{i}" for i in range(6)]
    assert out["per_query"][5]["AP"]["H"] is None and "per_class" not in out
    _check_means(out, r.mAP)
    # a folder set: one setting, and the queries' classes
    classes = ["a", "a", "b", "b", "b", "c"]
    r = _result("single", ranks, gnd, classes)
    out = report.per_query_json(r)
    _check_means(out, r.mAP)
    assert [q["class"] for q in out["per_query"]] == classes
    b = out["per_class"]["b"]
    assert b["queries"] == 3
    assert b["AP"]["all"] == pytest.approx(np.mean([out["per_query"][i]["AP"]["all"]
                                                    for i in (2, 3, 4)]))
    # GLDv2: each query counts in its Usage subset only
    g = [{"easy": rng.choice(20, 2, replace=False), "usage": u}
         for u in ("public", "private") * 3]
    r = _result("gldv2", ranks, g)
    out = report.per_query_json(r)
    assert out["per_query"][0]["AP"]["private"] is None
    _check_means(out, r.mAP)
    assert "per_query" in report.to_json([r], (1, 5), {})["p"]
