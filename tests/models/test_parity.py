"""Parity with the official PyTorch CVNet / SuperGlobal outputs in ../shared/parity.

Every key of every fixture is checked, for R50 and R101, with the tolerances stated in
../shared/parity/README.md: R50 through a converted model directory (`convert` +
`sj.load(<dir>)`), R101 through `sj.load(<.pyth>)`. Both routes give bit-identical
variables and the same module for both depths (checked below), so each route's parity
holds for the other. A fixture key this file does not know fails the run, so new reference
outputs cannot be ignored by accident.
"""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest

import scvnet_jax as sj

# Max absolute error allowed (../shared/parity/README.md); 0 = exact.
TOL_DESCRIPTOR = 1e-5
TOL_LAYER3 = 1e-4
TOL_CORR = 1e-5
TOL_LOGITS = 1e-4
TOL_SCORE = 1e-5

INPUT_KEYS = {"img0", "img1", "sgrr_X", "sgrr_Q", "sgrr_ranks_in", "map_score", "map_ranks",
              "map_gnd", "cvmix_local"}
SG_KEY = re.compile(r"^sg_relup(\d)_gemp(\d)_rgem(\d)_sgem(\d)_scale(\d)_(\d)$")
DEPTHS = (50, 101)
ROUTE = {50: "converted", 101: "pyth"}    # the other route: test_routes_give_the_same_model


def _nhwc(x):
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def _fixture_keys(fx):
    return [k for k in fx if k not in INPUT_KEYS]


@pytest.fixture(scope="module")
def fixtures(parity_fixture):
    return {d: parity_fixture(d) for d in DEPTHS}


@pytest.fixture(scope="module")
def models(official_checkpoint, converted_dir):
    cache = {}

    def get(depth, route):
        if (depth, route) not in cache:
            path = official_checkpoint(depth) if route == "pyth" else converted_dir(depth)
            cache[(depth, route)] = sj.load(path)
        return cache[(depth, route)]

    return get


def _close(actual, expected, tol, what):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.max(np.abs(actual - expected)))
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.0e}"


def check_model_key(model, fx, key):
    """Compares one model output with the fixture; returns False for non-model keys."""
    x = [_nhwc(fx["img0"]), _nhwc(fx["img1"])]
    if m := re.match(r"^cvnet_global(\d)$", key):
        _close(model.global_descriptor(x[int(m[1])]), fx[key], TOL_DESCRIPTOR, key)
    elif m := re.match(r"^cvnet_layer3_(\d)$", key):
        _close(model.local_features(x[int(m[1])]), _nhwc(fx[key]), TOL_LAYER3, key)
    elif key == "cvnet_corr_q0k1":
        corr = model.correlation(model.local_features(x[0]), model.local_features(x[1]))
        _close(np.moveaxis(np.asarray(corr), -1, 1), fx[key], TOL_CORR, key)
    elif key == "cvnet_logits_q0k1":
        logits = model.verification_logits(model.local_features(x[0]),
                                           model.local_features(x[1]))
        _close(logits, fx[key], TOL_LOGITS, key)
    elif key == "cvnet_score_q0k1":
        _close(model.verification_score(x[0], x[1]), fx[key], TOL_SCORE, key)
    elif key == "cvnet_score_q0k0":
        _close(model.verification_score(x[0], x[0][::-1]), fx[key], TOL_SCORE, key)
    elif key == "cvnet_score_self":
        _close(model.verification_score(x[0], x[0]), fx[key], TOL_SCORE, key)
    elif m := SG_KEY.match(key):
        relup, gemp, rgem, sgem, scale, i = (int(v) for v in m.groups())
        got = model.superglobal_descriptor(x[i], scales=scale, rgem=bool(rgem),
                                           sgem=bool(sgem), relup=bool(relup), gemp=bool(gemp))
        _close(got, fx[key], TOL_DESCRIPTOR, key)
    else:
        return False
    return True


def check_pipeline_key(fx, key, gnd_from_fixture):
    """Checks the keys that test metric and reranking code; returns False for others."""
    if key == "sgrr_ranks_out":
        out = sj.rerank.superglobal(fx["sgrr_X"].astype(np.float32),
                                    fx["sgrr_Q"].astype(np.float32), fx["sgrr_ranks_in"],
                                    M=400, K=9, beta=0.15)
        np.testing.assert_array_equal(out, fx[key])
    elif key in ("map_EMH", "mpk_EMH"):
        mE, mM, mH, mpk = sj.metrics.revisitop(fx["map_ranks"], gnd_from_fixture(fx),
                                               ks=(1, 5, 10))
        got = np.array([mE, mM, mH]) if key == "map_EMH" else mpk
        np.testing.assert_array_equal(got, fx[key])  # bit-exact
    elif key == "cvmix_ranks_EMH":
        got = sj.rerank.cvnet.official(fx["map_ranks"], fx["map_score"], fx["cvmix_local"],
                                       gnd_from_fixture(fx), topk=20, mix=0.5)
        np.testing.assert_array_equal(np.stack(got), fx[key])
    else:
        return False
    return True


@pytest.mark.parametrize("depth", [50, pytest.param(101, marks=pytest.mark.slow)])
def test_model_outputs(models, fixtures, depth):
    """Every model output of the depth's fixture (R101's runs in the full suite, as CI does,
    not in the everyday loop: the same code as R50's at twice the depth, ~65 s)."""
    model = models(depth, ROUTE[depth])
    assert model.depth == depth
    failures, checked = [], 0
    for key in _fixture_keys(fixtures[depth]):
        try:
            checked += check_model_key(model, fixtures[depth], key)
        except AssertionError as e:
            failures.append(str(e))
            checked += 1
    assert checked >= 19, f"only {checked} model outputs checked"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("depth", DEPTHS)
def test_routes_give_the_same_model(models, depth):
    """A .pyth file and its converted directory load into the same module and bit-identical
    variables, so parity through one route is parity through the other."""
    a, b = models(depth, "pyth"), models(depth, "converted")
    assert a.module == b.module
    fa = jax.tree_util.tree_flatten_with_path(a.variables)[0]
    fb = jax.tree_util.tree_flatten_with_path(b.variables)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        assert x.dtype == y.dtype, jax.tree_util.keystr(p)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(p))


@pytest.mark.parametrize("depth", DEPTHS)
def test_pipeline_outputs(fixtures, depth, gnd_from_fixture):
    checked = [k for k in _fixture_keys(fixtures[depth])
               if check_pipeline_key(fixtures[depth], k, gnd_from_fixture)]
    assert sorted(checked) == ["cvmix_ranks_EMH", "map_EMH", "mpk_EMH", "sgrr_ranks_out"]


@pytest.mark.parametrize("depth", DEPTHS)
def test_every_fixture_key_is_checked(fixtures, depth):
    """Dispatch coverage: every non-input key is a model or a pipeline key."""
    model_keys = {"cvnet_corr_q0k1", "cvnet_logits_q0k1", "cvnet_score_q0k1",
                  "cvnet_score_q0k0", "cvnet_score_self"}
    pipeline_keys = {"sgrr_ranks_out", "map_EMH", "mpk_EMH", "cvmix_ranks_EMH"}
    unknown = [k for k in _fixture_keys(fixtures[depth])
               if k not in model_keys | pipeline_keys
               and not re.match(r"^cvnet_(global|layer3_)\d$", k) and not SG_KEY.match(k)]
    assert not unknown, f"fixture keys without a check: {unknown}"


def test_superglobal_quirk_matters(models, fixtures):
    """The stage-1 clamp quirk is load-bearing: without it relup0 fixtures do not match."""
    fx, model = fixtures[50], models(50, ROUTE[50])
    key = "sg_relup0_gemp1_rgem0_sgem0_scale1_0"
    got = model.superglobal_descriptor(_nhwc(fx["img0"]), scales=1, rgem=False, sgem=False,
                                       relup=False, official_quirk=False)
    assert np.max(np.abs(np.asarray(got, np.float64) - fx[key])) > TOL_DESCRIPTOR
