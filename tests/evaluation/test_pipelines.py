"""The evaluation pipelines through eval.py on ../shared/minirevisit: parity with the official
test scripts (the R50 parity weights), output formats, result grids, caching (nothing
recomputed; a head-only change reuses the descriptors) and resume after SIGKILL, +R1M
distractors, and bad input. What does not depend on the weights runs on the tiny model."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import time

import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax.convert import save_model_dir

PIPELINES = ("cvnet_global", "cvnet_rerank", "superglobal_global", "superglobal_rerank")
CONFIG = "eval_minirevisit.py"      # shipped config, found by name


@pytest.fixture(scope="module")
def official(shared):
    with np.load(shared.minirevisit / "official_r50_seed0.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def run(converted_dir, tmp_path_factory, eval_main, shared):
    """One full run (all four pipelines, top-10, official protocol) with visuals."""
    tmp = tmp_path_factory.mktemp("eval")
    out, cache, vis = tmp / "results.json", tmp / "cache", tmp / "vis"
    weights = converted_dir(50)
    rc = eval_main("--config", CONFIG, "--data_dir", shared.minirevisit, "--weights", weights,
                  "--topk", 10, "--protocol", "official", "--output", out,
                  "--cache_dir", cache, "--save_visuals", vis)
    assert rc == 0
    with np.load(tmp / "results_ranks.npz") as z:
        ranks = {k: z[k] for k in z.files}
    return dict(results=json.loads(out.read_text()), ranks=ranks, out=out, cache=cache,
                vis=vis, weights=weights, tmp=tmp)


@pytest.mark.slow   # the full R50 run (`run`): ~5 min on 2 cores
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_minirevisit_matches_official(run, official, pipeline):
    r = run["results"][pipeline]
    np.testing.assert_array_equal([r["mAP"][s] for s in "EMH"], official[f"{pipeline}_mapEMH"])
    np.testing.assert_array_equal([r["mP@k"][s] for s in "EMH"], official[f"{pipeline}_mpk"])
    if pipeline == "cvnet_rerank":
        got = np.stack([run["ranks"][f"cvnet_rerank_{s}"] for s in "EMH"])
        np.testing.assert_array_equal(got, official["cvnet_rerank_ranksEMH"])
    else:
        np.testing.assert_array_equal(run["ranks"][pipeline], official[f"{pipeline}_ranks"])


@pytest.mark.slow   # the full R50 run (`run`): ~5 min on 2 cores
def test_output_formats(run):
    res = run["results"]
    assert set(res) == set(PIPELINES)
    for name, r in res.items():
        assert set(r["mAP"]) == {"E", "M", "H"} and r["ks"] == [1, 5, 10]
        assert all(0 <= v <= 1 for v in r["mAP"].values())
        assert all(len(r["mP@k"][s]) == 3 and all(0 <= v <= 1 for v in r["mP@k"][s]) for s in "EMH")
        assert r["protocol"] == ("official" if name == "cvnet_rerank" else "label-free")
    assert res["cvnet_rerank"]["topk"] == 10
    assert sorted(run["ranks"]) == sorted(["cvnet_global", "cvnet_rerank_E", "cvnet_rerank_M",
                                           "cvnet_rerank_H", "superglobal_global",
                                           "superglobal_rerank"])
    assert all(v.shape == (60, 6) for v in run["ranks"].values())


@pytest.mark.slow   # the full R50 run (`run`): ~5 min on 2 cores
def test_result_grids(run):
    import cv2
    pngs = sorted(run["vis"].glob("*.png"))
    assert [p.name for p in pngs][:2] == ["000_q_astronaut.png", "001_q_chelsea.png"]
    assert len(pngs) == 6
    im = cv2.imread(str(pngs[0]))
    assert im.shape[0] > 4 * 128 and im.shape[1] > 11 * 128  # 4 rows, query + top-10


def _count_model_calls(monkeypatch):
    import scvnet_jax.api as api

    calls = []
    real = api._apply
    monkeypatch.setattr(api, "_apply", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    return calls


@pytest.mark.slow   # the full R50 run (`run`): ~5 min on 2 cores
def test_cached_rerun_computes_nothing(run, monkeypatch, eval_main, shared):
    calls = _count_model_calls(monkeypatch)
    out = run["tmp"] / "again.json"
    assert eval_main("--config", CONFIG, "--data_dir", shared.minirevisit, "--weights",
                     run["weights"], "--output", out, "--cache_dir", run["cache"]) == 0
    assert calls == []
    again = json.loads(out.read_text())
    for name in PIPELINES:
        assert again[name]["mAP"] == run["results"][name]["mAP"]


def test_head_only_change_reuses_the_descriptors(tiny_model_dir, monkeypatch, eval_main,
                                                  demo_benchmark, tmp_path):
    """Descriptor caches are keyed by the backbone: a model with another rerank head extracts
    nothing again (only its rerank scores are new), and its global rankings are identical
    (the tiny model on the demo benchmark, whose images share one size bucket: cache keys
    depend on neither the width nor the images' sizes)."""
    args = ["--dataset", "demo", "--data_dir", demo_benchmark, "--topk", 10, "--cache_dir",
            tmp_path / "cache"]
    first = tmp_path / "first.json"
    assert eval_main(*args, "--weights", tiny_model_dir, "--output", first) == 0
    model = sj.load(tiny_model_dir)
    v = {c: dict(t) for c, t in model.variables.items()}
    v["params"]["cv_learner"] = {**v["params"]["cv_learner"]}
    v["params"]["cv_learner"]["mlp_2"] = {
        "kernel": -np.asarray(v["params"]["cv_learner"]["mlp_2"]["kernel"]),
        "bias": np.asarray(v["params"]["cv_learner"]["mlp_2"]["bias"])}
    other = save_model_dir(tmp_path / "other_head", model.arch, v)
    calls = _count_model_calls(monkeypatch)
    out = tmp_path / "other.json"
    assert eval_main(*args, "--weights", other, "--output", out) == 0
    assert set(calls) == {"local_features", "verification_score_from_features"}, set(calls)
    res, ref = json.loads(out.read_text()), json.loads(first.read_text())
    for name in ("cvnet_global", "superglobal_global", "superglobal_rerank"):
        assert res[name]["mAP"] == ref[name]["mAP"]
    assert res["cvnet_rerank"]["mAP"] != ref["cvnet_rerank"]["mAP"]


def test_kill_and_resume(tmp_path, tiny_model_dir, run_module, eval_main, demo_benchmark):
    """SIGKILL mid-extraction, same command again: finished chunks are reused untouched and
    the numbers equal those of an uninterrupted run (the tiny model on the demo benchmark:
    the mechanics depend on neither the weights nor the images)."""
    n_db = len(pickle.loads((demo_benchmark / "demo" / "gnd_demo.pkl").read_bytes())["imlist"])
    chunk = 4
    n_chunks = -(-n_db // chunk)
    args = ["--dataset", "demo", f"--config.chunk_size={chunk}", "--pipelines",
            "cvnet_global", "--weights", tiny_model_dir, "--data_dir", demo_benchmark]
    ref = tmp_path / "ref"
    assert eval_main(*args, "--output", ref / "results.json", "--cache_dir", "") == 0
    out, cache = tmp_path / "results.json", tmp_path / "cache"
    args += ["--output", out, "--cache_dir", cache]
    proc = run_module("eval", *args, wait=False)
    deadline = time.time() + 600
    while time.time() < deadline and not list(cache.glob("cvnet-db-*/chunk_000002.npy")):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    first = {p: p.stat().st_mtime_ns for p in cache.glob("cvnet-db-*/chunk_*.npy")}
    assert 3 <= len(first) < n_chunks, "the kill did not land mid-extraction"
    done = run_module("eval", *args)
    assert done.returncode == 0, done.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # reused, not rewritten
    assert len(list(cache.glob("cvnet-db-*/chunk_*.npy"))) == n_chunks
    res = json.loads(out.read_text())["cvnet_global"]
    assert res["mAP"] == json.loads((ref / "results.json").read_text())["cvnet_global"]["mAP"]
    with np.load(tmp_path / "results_ranks.npz") as a, np.load(ref / "results_ranks.npz") as b:
        np.testing.assert_array_equal(a["cvnet_global"], b["cvnet_global"])


# -- bad input: one clear message, exit code 2, no results file ----------------------------

@pytest.fixture
def data_copy(tmp_path, shared):
    shutil.copytree(shared.minirevisit / "roxford5k", tmp_path / "data" / "roxford5k")
    return tmp_path / "data"


def _fails(capsys, tmp_path, weights, data_dir, expect, eval_main, one_error_line):
    out = tmp_path / "results.json"
    rc = eval_main("--config", CONFIG, "--data_dir", data_dir, "--weights", weights,
                   "--output", out, "--cache_dir", "")
    assert rc == 2
    line = one_error_line(capsys.readouterr().err, *expect)
    assert not out.exists()
    return line


@pytest.fixture
def fails(capsys, tmp_path, eval_main, one_error_line):
    return lambda weights, data_dir, expect: _fails(capsys, tmp_path, weights, data_dir,
                                                    expect, eval_main, one_error_line)


@pytest.fixture
def weights(tiny_model_dir):
    return tiny_model_dir


def test_data_dir_without_dataset(fails, tmp_path, weights):
    fails(weights, tmp_path, ["no roxford5k dataset", "gnd_roxford5k.pkl"])


def test_missing_image(fails, weights, data_copy):
    (data_copy / "roxford5k" / "jpg" / "chelsea_3.jpg").unlink()
    fails(weights, data_copy, ["1 database image(s) missing", "chelsea_3.jpg"])


def test_unreadable_image(fails, weights, data_copy):
    (data_copy / "roxford5k" / "jpg" / "astronaut_0.jpg").write_bytes(b"not a jpeg")
    fails(weights, data_copy, ["astronaut_0.jpg: cannot read the image"])


def test_malformed_gnd(fails, weights, data_copy):
    path = data_copy / "roxford5k" / "gnd_roxford5k.pkl"
    gnd = pickle.loads(path.read_bytes())
    del gnd["gnd"][2]["bbx"]
    path.write_bytes(pickle.dumps(gnd))
    fails(weights, data_copy, ["gnd_roxford5k.pkl: gnd[2] (query 'q_coffee'): missing bbx"])
    gnd["gnd"][2]["bbx"] = [0, 0, 10, 10]
    gnd["gnd"][3]["easy"] = [1, 2, 999]
    path.write_bytes(pickle.dumps(gnd))
    fails(weights, data_copy, ["gnd[3]", "'easy'", "[0, 60)"])


def test_gnd_pickle_cannot_run_code(fails, tmp_path, weights, data_copy):
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {canary}",)

    (data_copy / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(pickle.dumps({"imlist": Evil()}))
    fails(weights, data_copy, ["refusing to load the global"])
    assert not canary.exists()


def test_weights_of_the_wrong_kind(fails, tmp_path, shared):
    bad = tmp_path / "weights.pyth"
    bad.write_text("these are not weights")
    fails(bad, shared.minirevisit, ["weights.pyth", "not a PyTorch checkpoint"])


def test_distractors_extend_the_database(tmp_path, weights, eval_main, shared):
    """--distractors appends images to the database: rankings then cover them, and the
    labelled part is unchanged (a distractor is always a negative)."""
    root = tmp_path / "data" / "roxford5k"
    (root / "jpg").mkdir(parents=True)
    src = shared.minirevisit / "roxford5k"
    gnd = pickle.loads((src / "gnd_roxford5k.pkl").read_bytes())
    keep = list(range(10))  # astronaut_* and chelsea_*: the first two queries' images
    small = {"imlist": [gnd["imlist"][i] for i in keep], "qimlist": gnd["qimlist"][:2],
             "gnd": gnd["gnd"][:2]}
    for name in small["imlist"] + small["qimlist"]:
        shutil.copy(src / "jpg" / f"{name}.jpg", root / "jpg")
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(small))
    dis_dir = tmp_path / "r1m"
    (dis_dir / "jpg").mkdir(parents=True)
    names = gnd["imlist"][10:13]
    for name in names:
        shutil.copy(src / "jpg" / f"{name}.jpg", dis_dir / "jpg")
    (dis_dir / "revisitop1m.txt").write_text("".join(f"jpg/{n}.jpg\n" for n in names))
    out = tmp_path / "results.json"
    assert eval_main("--config", CONFIG, "--data_dir", tmp_path / "data", "--weights", weights,
                     "--pipelines", "cvnet_global", "--distractors",
                     dis_dir / "revisitop1m.txt", "--output", out, "--cache_dir", "") == 0
    res = json.loads(out.read_text())["cvnet_global"]
    assert res["dataset"] == "roxford5k+R1M" and res["n_db"] == 13
    with np.load(tmp_path / "results_ranks.npz") as z:
        ranks = z["cvnet_global"]
    assert ranks.shape == (13, 2) and sorted(ranks[:, 0]) == list(range(13))
