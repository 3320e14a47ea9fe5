"""ICFRR against the official code's outputs (../shared/rerankers/icfrr_seed*.npz): every
setting the fixture holds (found by its `*/params` keys, never by name), every iteration's
ranking identical, the votes and sums at 1e-6, the rank profile identical, the official
metrics to their printed precision; plus the memory guard and the shortlist mode."""
from __future__ import annotations

import json

import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax.errors import ConfigError, InputError
# the module (sj.rerank.icfrr is its function of the same name)
from scvnet_jax.rerank.icfrr import iterations, memory_bytes, rank_matrix


@pytest.fixture(scope="module")
def fixture(rerankers_fixture):
    return rerankers_fixture("icfrr")


def _settings(fx):
    names = sorted(k[:-len("/params")] for k in fx if k.endswith("/params"))
    assert names, "no ICFRR settings in the fixture"
    return names


def _case(fx, name):
    params = json.loads(str(fx[f"{name}/params"]))
    data = str(fx[f"{name}/data"])
    return params, fx[f"{data}/qg_dists"], fx[f"{data}/gg_dists"], data


def test_every_setting_matches_the_official_code(fixture):
    for name in _settings(fixture):
        p, qg, gg, _ = _case(fixture, name)
        want = fixture[f"{name}/ranks"]                              # (n_times+1, nq, G)
        got = sj.rerank.icfrr(qg, gg, return_all=True, **p)          # (n_times+1, G, nq)
        assert got.shape == (p["n_times"] + 1, qg.shape[1], qg.shape[0]), name
        np.testing.assert_array_equal(np.transpose(got, (0, 2, 1)), want, err_msg=name)
        np.testing.assert_array_equal(sj.rerank.icfrr(qg, gg, **p), got[-1], err_msg=name)

        _, scores, sums, vals = iterations(
            qg, gg, p["KG"], p["KQ"], p["beta"], p["n_times"], p["limited_memory"])
        np.testing.assert_allclose(vals, fixture[f"{name}/sorted_vals"], rtol=0, atol=0)
        np.testing.assert_allclose(scores, fixture[f"{name}/scores"], rtol=0, atol=1e-6,
                                   err_msg=name)
        np.testing.assert_allclose(sums, fixture[f"{name}/sums"], rtol=0, atol=1e-6,
                                   err_msg=name)
        np.testing.assert_array_equal(rank_matrix(gg, p["limited_memory"]),
                                      fixture[f"{name}/intersect"], err_msg=name)


def test_official_metrics_at_every_iteration(fixture):
    """mAP@all, mAP@200, P@25, P@100, P@200 per iteration, as the official run printed them
    (5 decimals)."""
    for name in _settings(fixture):
        p, qg, gg, data = _case(fixture, name)
        ranks = sj.rerank.icfrr(qg, gg, return_all=True, **p)
        got = [list(sj.metrics.labelled(r, fixture[f"{data}/labels_query"],
                                        fixture[f"{data}/labels_gallery"]).values())
               for r in ranks]
        np.testing.assert_array_equal(np.round(got, 5), np.round(fixture[f"{name}/metrics"],
                                                                 5), err_msg=name)


def test_memory_guard_and_shortlist(fixture):
    name = _settings(fixture)[0]
    p, qg, gg, _ = _case(fixture, name)
    need = memory_bytes(qg.shape[1], qg.shape[0])
    with pytest.raises(InputError, match=r"needs .* GiB .* shortlist"):
        sj.rerank.icfrr(qg, gg, max_bytes=need - 1, **p)
    # a shortlist as long as the gallery is the official method
    full = sj.rerank.icfrr(qg, gg, **p)
    np.testing.assert_array_equal(sj.rerank.icfrr(qg, gg, shortlist=qg.shape[1], **p), full)
    # a short one re-ranks each query's top S among themselves and keeps the rest in place
    s = qg.shape[1] // 3
    short = sj.rerank.icfrr(qg, gg, shortlist=s, **p)
    initial = np.argsort(qg, axis=1, kind="stable").T
    np.testing.assert_array_equal(short[s:], initial[s:])
    assert all(set(short[:s, q]) == set(initial[:s, q]) for q in range(qg.shape[0]))


def test_bad_arguments_are_refused():
    qg, gg = np.zeros((2, 5), np.float32), np.zeros((5, 5), np.float32)
    with pytest.raises(InputError, match="gg_dists"):
        sj.rerank.icfrr(qg, gg[:4])
    with pytest.raises(ConfigError, match="KQ"):
        sj.rerank.icfrr(qg, gg, KQ=0)
    qg[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        sj.rerank.icfrr(qg, gg)
