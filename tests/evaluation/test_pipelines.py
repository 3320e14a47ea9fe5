"""eval.py end to end on ../shared/minirevisit: parity with the official test scripts,
output formats, caching and resume after SIGKILL, result grids, and bad input."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import MINIREVISIT, REPO
from scvnet_jax.config_files import load_module

PIPELINES = ("cvnet_global", "cvnet_rerank", "superglobal_global", "superglobal_rerank")
CONFIG = REPO / "configs" / "eval_minirevisit.py"


def _eval_module():
    return load_module(REPO / "eval.py")


def run_eval(*args) -> int:
    return _eval_module().main([str(a) for a in args])


@pytest.fixture(scope="module")
def official():
    with np.load(MINIREVISIT / "official_r50_seed0.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def run(converted_dir, tmp_path_factory):
    """One full run (all four pipelines, top-10, official protocol) with visuals."""
    tmp = tmp_path_factory.mktemp("eval")
    out, cache, vis = tmp / "results.json", tmp / "cache", tmp / "vis"
    weights = converted_dir(50)
    rc = run_eval("--config", CONFIG, "--data_dir", MINIREVISIT, "--weights", weights,
                  "--topk", 10, "--protocol", "official", "--output", out,
                  "--cache_dir", cache, "--save_visuals", vis)
    assert rc == 0
    with np.load(tmp / "results_ranks.npz") as z:
        ranks = {k: z[k] for k in z.files}
    return dict(results=json.loads(out.read_text()), ranks=ranks, out=out, cache=cache,
                vis=vis, weights=weights, tmp=tmp)


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


def test_result_grids(run):
    import cv2
    pngs = sorted(run["vis"].glob("*.png"))
    assert [p.name for p in pngs][:2] == ["000_q_astronaut.png", "001_q_chelsea.png"]
    assert len(pngs) == 6
    im = cv2.imread(str(pngs[0]))
    assert im.shape[0] > 4 * 128 and im.shape[1] > 11 * 128  # 4 rows, query + top-10


def test_cached_rerun_computes_nothing(run, monkeypatch):
    import scvnet_jax.api as api

    calls = []
    real = api._apply
    monkeypatch.setattr(api, "_apply", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    out = run["tmp"] / "again.json"
    assert run_eval("--config", CONFIG, "--data_dir", MINIREVISIT, "--weights", run["weights"],
                    "--output", out, "--cache_dir", run["cache"]) == 0
    assert calls == []
    again = json.loads(out.read_text())
    for name in PIPELINES:
        assert again[name]["mAP"] == run["results"][name]["mAP"]


def test_kill_and_resume(run, tmp_path):
    """SIGKILL mid-extraction, same command again: finished chunks are reused untouched and
    the numbers equal the uninterrupted run."""
    cfg = tmp_path / "small_chunks.py"
    cfg.write_text(f"import runpy\n\ndef get_config():\n"
                   f"    c = runpy.run_path({str(CONFIG)!r})['get_config']()\n"
                   f"    c.chunk_size = 8\n    c.pipelines = ['cvnet_global']\n    return c\n")
    out, cache = tmp_path / "results.json", tmp_path / "cache"
    cmd = [sys.executable, str(REPO / "eval.py"), "--config", str(cfg), "--weights",
           str(run["weights"]), "--data_dir", str(MINIREVISIT), "--output", str(out),
           "--cache_dir", str(cache)]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(run["cache"] / "xla")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not list(cache.glob("cvnet-db-*/chunk_000001.npy")):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    first = {p: p.stat().st_mtime_ns for p in cache.glob("cvnet-db-*/chunk_*.npy")}
    assert 2 <= len(first) < 8, "the kill did not land mid-extraction"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # reused, not rewritten
    assert len(list(cache.glob("cvnet-db-*/chunk_*.npy"))) == 8
    res = json.loads(out.read_text())["cvnet_global"]
    assert res["mAP"] == run["results"]["cvnet_global"]["mAP"]
    with np.load(tmp_path / "results_ranks.npz") as z:
        np.testing.assert_array_equal(z["cvnet_global"], run["ranks"]["cvnet_global"])


def test_changed_settings_get_their_own_cache(tmp_path):
    from scvnet_jax.evaluation import extract
    from scvnet_jax.evaluation.cache import ChunkCache

    base = {"weights": "w", "gnd": "g"}
    a = ChunkCache(tmp_path, "superglobal-db", {**base, "spec": repr(extract.SuperGlobal())}, 8)
    b = ChunkCache(tmp_path, "superglobal-db",
                   {**base, "spec": repr(extract.SuperGlobal(rgem=False))}, 8)
    c = ChunkCache(tmp_path, "superglobal-db", {**base, "weights": "w2",
                                                "spec": repr(extract.SuperGlobal())}, 8)
    assert len({a.dir, b.dir, c.dir}) == 3


# -- bad input: one clear message, exit code 2, no results file ----------------------------

@pytest.fixture
def data_copy(tmp_path):
    shutil.copytree(MINIREVISIT / "roxford5k", tmp_path / "data" / "roxford5k")
    return tmp_path / "data"


def _fails(capsys, tmp_path, weights, data_dir, expect):
    out = tmp_path / "results.json"
    rc = run_eval("--config", CONFIG, "--data_dir", data_dir, "--weights", weights,
                  "--output", out, "--cache_dir", "")
    err = capsys.readouterr().err
    assert rc == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for text in expect:
        assert text in errors[0], err
    assert not out.exists()
    return errors[0]


@pytest.fixture
def weights(converted_dir):
    return converted_dir(50)


def test_data_dir_without_dataset(capsys, tmp_path, weights):
    _fails(capsys, tmp_path, weights, tmp_path,
           ["no roxford5k dataset", "gnd_roxford5k.pkl"])


def test_missing_image(capsys, tmp_path, weights, data_copy):
    (data_copy / "roxford5k" / "jpg" / "chelsea_3.jpg").unlink()
    _fails(capsys, tmp_path, weights, data_copy,
           ["1 database image(s) missing", "chelsea_3.jpg"])


def test_unreadable_image(capsys, tmp_path, weights, data_copy):
    (data_copy / "roxford5k" / "jpg" / "astronaut_0.jpg").write_bytes(b"not a jpeg")
    _fails(capsys, tmp_path, weights, data_copy,
           ["astronaut_0.jpg: cannot read the image"])


def test_malformed_gnd(capsys, tmp_path, weights, data_copy):
    path = data_copy / "roxford5k" / "gnd_roxford5k.pkl"
    gnd = pickle.loads(path.read_bytes())
    del gnd["gnd"][2]["bbx"]
    path.write_bytes(pickle.dumps(gnd))
    _fails(capsys, tmp_path, weights, data_copy,
           ["gnd_roxford5k.pkl: gnd[2] (query 'q_coffee'): missing bbx"])
    gnd["gnd"][2]["bbx"] = [0, 0, 10, 10]
    gnd["gnd"][3]["easy"] = [1, 2, 999]
    path.write_bytes(pickle.dumps(gnd))
    _fails(capsys, tmp_path, weights, data_copy, ["gnd[3]", "'easy'", "[0, 60)"])


def test_gnd_pickle_cannot_run_code(capsys, tmp_path, weights, data_copy):
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {canary}",)

    (data_copy / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(pickle.dumps({"imlist": Evil()}))
    _fails(capsys, tmp_path, weights, data_copy, ["refusing to load the global"])
    assert not canary.exists()


def test_weights_of_the_wrong_kind(capsys, tmp_path):
    bad = tmp_path / "weights.pyth"
    bad.write_text("these are not weights")
    _fails(capsys, tmp_path, bad, MINIREVISIT, ["weights.pyth", "not a PyTorch checkpoint"])


def test_help():
    out = subprocess.run([sys.executable, str(REPO / "eval.py"), "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0
    for flag in ("--dataset", "--data_dir", "--weights", "--pipelines", "--topk", "--protocol",
                 "--distractors", "--output", "--save_visuals", "--cache_dir", "--bucket"):
        assert flag in out.stdout


def test_distractors_extend_the_database(tmp_path, weights):
    """--distractors appends images to the database: rankings then cover them, and the
    labelled part is unchanged (a distractor is always a negative)."""
    root = tmp_path / "data" / "roxford5k"
    (root / "jpg").mkdir(parents=True)
    gnd = pickle.loads((MINIREVISIT / "roxford5k" / "gnd_roxford5k.pkl").read_bytes())
    keep = list(range(10))  # astronaut_* and chelsea_*: the first two queries' images
    small = {"imlist": [gnd["imlist"][i] for i in keep], "qimlist": gnd["qimlist"][:2],
             "gnd": gnd["gnd"][:2]}
    for name in small["imlist"] + small["qimlist"]:
        shutil.copy(MINIREVISIT / "roxford5k" / "jpg" / f"{name}.jpg", root / "jpg")
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(small))
    dis_dir = tmp_path / "r1m"
    (dis_dir / "jpg").mkdir(parents=True)
    names = gnd["imlist"][10:13]
    for name in names:
        shutil.copy(MINIREVISIT / "roxford5k" / "jpg" / f"{name}.jpg", dis_dir / "jpg")
    (dis_dir / "revisitop1m.txt").write_text("".join(f"jpg/{n}.jpg\n" for n in names))
    out = tmp_path / "results.json"
    assert run_eval("--config", CONFIG, "--data_dir", tmp_path / "data", "--weights", weights,
                    "--pipelines", "cvnet_global", "--distractors",
                    dis_dir / "revisitop1m.txt", "--output", out, "--cache_dir", "") == 0
    res = json.loads(out.read_text())["cvnet_global"]
    assert res["dataset"] == "roxford5k+R1M" and res["n_db"] == 13
    with np.load(tmp_path / "results_ranks.npz") as z:
        ranks = z["cvnet_global"]
    assert ranks.shape == (13, 2) and sorted(ranks[:, 0]) == list(range(13))
