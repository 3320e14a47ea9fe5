"""Validation during training (config.eval) on the tiny stage-1 config and the demo
benchmark: the scores in metrics.jsonl and TensorBoard, W/model_best equal to eval.py's
scoring of it, a checkpoint step as --weights, exact resume with validation on, and the
per-query AP of results.json."""
from __future__ import annotations

import json
import struct

import jax
import numpy as np
import pytest

STEPS = ["--config.total_steps=4", "--config.checkpoint_every_steps=2",
         "--config.eval.every_steps=2", "--config.eval.dataset=demo"]
KEY = "val/cvnet_global/mAP/M"


def _env(demo_home):
    # the demo benchmark and the compiled programs shared with the other demo tests
    return {"XDG_CACHE_HOME": str(demo_home / "cache")}


@pytest.fixture(scope="module")
def run(tmp_path_factory, run_train, demo_tfds, demo_home):
    work = tmp_path_factory.mktemp("val") / "w"
    r = run_train(work, *STEPS, data_dir=demo_tfds, config="demo.py:tiny", env=_env(demo_home))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work, r.stdout


def _records(work):
    return [json.loads(ln) for ln in (work / "metrics.jsonl").read_text().splitlines()]


def _tensorboard_scalars(work) -> dict:
    """{tag: {step: value}} read back from the event files (TFRecord framing, tensorboardX's
    own Event protobuf)."""
    from tensorboardX.proto import event_pb2

    out: dict = {}
    for path in sorted((work / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
def test_validation_scores_are_logged_and_the_best_model_is_kept(run, demo_eval, medium_map):
    work, stdout = run
    recs = _records(work)
    assert [r["step"] for r in recs] == [2, 4] and all("loss" in r for r in recs)
    for r in recs:
        assert {KEY, "val/cvnet_global/mAP/E", "val/cvnet_global/mAP/H",
                "val/cvnet_global/mP@5/M"} <= set(r), r
        assert 0 < r[KEY] <= 1
    assert "validation at step 2 (demo, mAP %): cvnet_global E" in stdout, stdout[-2000:]
    tb = _tensorboard_scalars(work)
    assert tb[KEY] == pytest.approx({r["step"]: r[KEY] for r in recs}, rel=1e-6)
    assert 4 in tb["train/loss"]
    # W/model_best: the best step's model; eval.py scores it exactly as validation did
    best = max(recs, key=lambda r: r[KEY])
    meta = json.loads((work / "model_best" / "config.json").read_text())["meta"]
    assert meta["step"] == best["step"] and meta["validation"][KEY] == best[KEY]
    _, path = demo_eval("--weights", work / "model_best", "--pipelines", "cvnet_global",
                        output="val_best.json")
    for s in "EMH":
        assert medium_map(path, "cvnet_global", s) == best[f"val/cvnet_global/mAP/{s}"]
    # results.json: every query's AP, whose mean (over the queries that count) is the mAP
    res = json.loads(path.read_text())["cvnet_global"]
    assert len(res["per_query"]) == res["n_queries"] == 30
    assert res["per_query"][0]["query"].endswith("_query")
    for s, m in res["mAP"].items():
        aps = [q["AP"][s] for q in res["per_query"] if q["AP"][s] is not None]
        assert np.mean(aps) == pytest.approx(m, rel=1e-12, abs=1e-15)


def test_a_checkpoint_step_loads_as_a_model(run):
    """--weights W/checkpoints/<step> (eval.py, scvnet-search, sj.load): the model W/model
    holds for that step (the last step here)."""
    import scvnet_jax as sj

    work, _ = run
    a, b = sj.load(work / "checkpoints" / "4"), sj.load(work / "model")
    assert a.arch == b.arch
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_resume_with_validation_is_exact(tmp_path, run, run_train, demo_tfds, demo_home,
                                         kill_at_checkpoint, assert_same_checkpoint):
    """SIGKILL right after checkpoint 2 (its validation is done before it is written), the
    same command again: the uninterrupted run's state and validation scores, bit for bit."""
    full, _ = run
    work = tmp_path / "killed"
    proc = run_train(work, *STEPS, data_dir=demo_tfds, config="demo.py:tiny", wait=False,
                     env=_env(demo_home))
    kill_at_checkpoint(proc, work / "checkpoints" / "2")
    r = run_train(work, *STEPS, data_dir=demo_tfds, config="demo.py:tiny", env=_env(demo_home))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert_same_checkpoint(full, work, 4)
    val = lambda w: [{k: v for k, v in rec.items() if k.startswith("val/")}
                     for rec in _records(w)]
    assert val(work) == val(full)


@pytest.mark.parametrize("over, text", [
    ({"stage": "csa"}, "validation during training is for the CVNet stages cvnet_global and "
                       "cvnet_rerank, not 'csa'"),
    ({"eval.dataset": "nope"}, "config.eval.dataset = 'nope': expected one of"),
    ({"eval.dataset": "roxford5k"}, "needs config.eval.data_dir"),
    ({"eval.pipelines": ("csa",)}, "config.eval.pipelines = ['csa']"),
    ({"eval.best_by": "cvnet_rerank/M"}, "config.eval.best_by = 'cvnet_rerank/M'"),
    ({"eval.every_steps": -1}, "config.eval.every_steps = -1"),
])
def test_bad_eval_settings_are_one_config_error(over, text):
    from scvnet_jax.configs import demo
    from scvnet_jax.errors import ConfigError
    from scvnet_jax.training import config

    cfg = demo.set_fields(demo.get_config("tiny"), {"eval.every_steps": 2, **over})
    with pytest.raises(ConfigError, match=None) as e:
        config.validate(cfg)
    assert text in str(e.value), str(e.value)
