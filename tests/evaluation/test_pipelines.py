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
from pathlib import Path

import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax.evaluation.config import PIPELINES
from scvnet_jax.convert import save_model_dir

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
                vis=vis, weights=weights, tmp=tmp, data_dir=shared.minirevisit)


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
    gnd = _gnd(run["data_dir"])
    shape = (len(gnd["imlist"]), len(gnd["qimlist"]))
    assert all(v.shape == shape for v in run["ranks"].values())


@pytest.mark.slow   # the full R50 run (`run`): ~5 min on 2 cores
def test_result_grids(run):
    import cv2
    pngs = sorted(run["vis"].glob("*.png"))
    queries = _gnd(run["data_dir"])["qimlist"]
    assert [p.name for p in pngs] == [f"{i:03d}_{q}.png" for i, q in enumerate(queries)]
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


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
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
    assert set(calls) == {"local_features", "corr_features",
                          "verification_score_from_corr_features"}, set(calls)
    res, ref = json.loads(out.read_text()), json.loads(first.read_text())
    for name in ("cvnet_global", "superglobal_global", "superglobal_rerank"):
        assert res[name]["mAP"] == ref[name]["mAP"]
    assert res["cvnet_rerank"]["mAP"] != ref["cvnet_rerank"]["mAP"]


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
def test_verifier_working_size_is_its_own_cache(tiny_model_dir, monkeypatch, eval_main,
                                                demo_benchmark, tmp_path):
    """--config.cvnet.max_side (the verifier's working size, issue 35) scores the pairs
    again at that size instead of serving the cached scores of the images' working size;
    the global ranking is untouched."""
    args = ["--dataset", "demo", "--data_dir", demo_benchmark, "--topk", 3, "--cache_dir",
            tmp_path / "cache", "--weights", tiny_model_dir, "--pipelines",
            "cvnet_global,cvnet_rerank"]
    first = tmp_path / "first.json"
    assert eval_main(*args, "--output", first) == 0
    calls = _count_model_calls(monkeypatch)
    out = tmp_path / "small.json"
    assert eval_main(*args, "--config.cvnet.max_side=64", "--output", out) == 0
    assert set(calls) == {"local_features", "corr_features",
                          "verification_score_from_corr_features"}, set(calls)
    res, ref = json.loads(out.read_text()), json.loads(first.read_text())
    assert res["cvnet_global"]["mAP"] == ref["cvnet_global"]["mAP"]
    assert res["cvnet_rerank"]["max_side"] == 64


def _kill_when(proc, cache, pattern: str) -> None:
    """SIGKILLs eval process `proc` as soon as a file matching `pattern` is in `cache`."""
    deadline = time.time() + 600
    while time.time() < deadline and not list(cache.glob(pattern)):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
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
    _kill_when(run_module("eval", *args, wait=False), cache, "cvnet-db-*/chunk_000002.npz")
    assert not out.exists()
    first = {p: p.stat().st_mtime_ns for p in cache.glob("cvnet-db-*/chunk_*.npz")}
    assert 3 <= len(first) < n_chunks, "the kill did not land mid-extraction"
    done = run_module("eval", *args)
    assert done.returncode == 0, done.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # reused, not rewritten
    assert len(list(cache.glob("cvnet-db-*/chunk_*.npz"))) == n_chunks
    res = json.loads(out.read_text())["cvnet_global"]
    assert res["mAP"] == json.loads((ref / "results.json").read_text())["cvnet_global"]["mAP"]
    with np.load(tmp_path / "results_ranks.npz") as a, np.load(ref / "results_ranks.npz") as b:
        np.testing.assert_array_equal(a["cvnet_global"], b["cvnet_global"])


@pytest.mark.slow   # an evaluation with CVNet reranking, twice: ~1 min on 2 cores
def test_kill_during_reranking_and_resume(tmp_path, tiny_model_dir, run_module, eval_main,
                                          demo_benchmark):
    """SIGKILL after the first batch of rerank scores is cached: the rerun reuses every
    cached descriptor and score and gives the uninterrupted run's rankings."""
    args = ["--dataset", "demo", "--pipelines", "cvnet_global,cvnet_rerank", "--topk", 8,
            "--weights", tiny_model_dir, "--data_dir", demo_benchmark]
    ref = tmp_path / "ref"
    assert eval_main(*args, "--output", ref / "results.json", "--cache_dir", "") == 0
    out, cache = tmp_path / "results.json", tmp_path / "cache"
    args += ["--output", out, "--cache_dir", cache]
    _kill_when(run_module("eval", *args, wait=False), cache, "cvnet-scores-*/chunk_r_*.npy")
    assert not out.exists()
    scores = {p: p.stat().st_mtime_ns for p in cache.glob("cvnet-scores-*/chunk_r_*.npy")}
    descs = {p: p.stat().st_mtime_ns for p in cache.glob("cvnet-*-*/chunk_*.npz")}
    done = run_module("eval", *args)
    assert done.returncode == 0, done.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in {**scores, **descs}.items())
    with np.load(tmp_path / "results_ranks.npz") as a, np.load(ref / "results_ranks.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
def test_reranker_pipelines_on_a_first_stage(tmp_path, tiny_model_dir, eval_main,
                                             demo_benchmark, capsys):
    """icfrr, csa, alpha_qe and dba rerank the chosen first stage: each is recorded with it
    and its time, gives a ranking of the whole database, and is the registry's reranker
    on that stage's descriptors (checked for alpha_qe, recomputed from the engine)."""
    from scvnet_jax.data.revisitop import load_dataset
    from scvnet_jax.engine import extract, search
    from scvnet_jax.models import csa

    arch = csa.CSAArch(anchor_len=8, embed_dim=16, depth=1, num_heads=2)
    weights = sj.rerank.csa.CSA(arch, csa.init(arch, 0)).save(tmp_path / "csa")
    out = tmp_path / "results.json"
    assert eval_main("--dataset", "demo", "--data_dir", demo_benchmark, "--weights",
                     tiny_model_dir, "--pipelines", "cvnet_global,icfrr,csa,alpha_qe,dba",
                     "--first_stage", "cvnet_global", "--csa_weights", weights,
                     "--config.csa.topk=16", "--config.icfrr.KG=8", "--config.icfrr.KQ=4",
                     "--output", out, "--cache_dir", tmp_path / "cache") == 0
    stdout = capsys.readouterr().out
    res = json.loads(out.read_text())
    with np.load(tmp_path / "results_ranks.npz") as z:
        ranks = {k: z[k] for k in z.files}
    first = ranks["cvnet_global"]
    for name in ("icfrr", "csa", "alpha_qe", "dba"):
        assert f"\n{name} (protocol: label-free, on cvnet_global)" in stdout
        assert res[name]["first_stage"] == "cvnet_global" and res[name]["rerank_ms_per_query"] > 0
        assert (np.sort(ranks[name], axis=0) == np.sort(first, axis=0)).all()
        assert not np.array_equal(ranks[name], first), name
    np.testing.assert_array_equal(ranks["csa"][16:], first[16:])   # only the top 16 moves
    ds = load_dataset(demo_benchmark, "demo")
    model = sj.load(tiny_model_dir)
    kw = dict(batch_size=16, bucket=256, chunk_size=64)   # configs/eval_demo.py's batches
    X = extract.extract(model, ds.db_images(), extract.CVNetGlobal(), **kw)
    Q = extract.extract(model, ds.query_images(), extract.CVNetGlobal(), **kw)
    np.testing.assert_array_equal(ranks["alpha_qe"], sj.rerank.alpha_qe(
        X, Q, search.rank(X, Q)[1], **res["alpha_qe"]["options"]))


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


def _gnd(data_dir):
    return pickle.loads((Path(data_dir) / "roxford5k" / "gnd_roxford5k.pkl").read_bytes())


def _image(data_dir, name):
    return Path(data_dir) / "roxford5k" / "jpg" / f"{name}.jpg"


def test_data_dir_without_dataset(fails, tmp_path, weights):
    fails(weights, tmp_path, ["no roxford5k dataset", "gnd_roxford5k.pkl"])


def test_missing_image(fails, weights, data_copy):
    name = _gnd(data_copy)["imlist"][3]
    _image(data_copy, name).unlink()
    fails(weights, data_copy, ["1 database image(s) missing", f"{name}.jpg"])


@pytest.mark.parametrize("damage", ["not an image", "truncated"])
def test_bad_database_image_is_named(fails, weights, data_copy, damage):
    path = _image(data_copy, _gnd(data_copy)["imlist"][-1])
    data = path.read_bytes()
    path.write_bytes(b"not a jpeg" if damage == "not an image" else data[:len(data) // 2])
    fails(weights, data_copy, [f"{path.name}: cannot read the image"])


@pytest.mark.parametrize("damage", ["truncated", "box"])
def test_bad_query_is_found_before_any_extraction(fails, weights, data_copy, monkeypatch,
                                                  damage):
    gnd = _gnd(data_copy)
    calls = _count_model_calls(monkeypatch)
    if damage == "truncated":
        path = _image(data_copy, gnd["qimlist"][-1])
        path.write_bytes(path.read_bytes()[:200])
        fails(weights, data_copy, [f"{path.name}: cannot read the image"])
    else:
        gnd["gnd"][-1]["bbx"] = [-20, 0, 10, 10]
        (data_copy / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gnd))
        fails(weights, data_copy, [f"{gnd['qimlist'][-1]}.jpg: query box"])
    assert calls == []


@pytest.mark.slow   # three evaluations of the demo benchmark: ~1 min on 2 cores
def test_a_replaced_image_is_not_served_from_the_cache(tmp_path, weights, demo_benchmark,
                                                       eval_main):
    """Two database photographs replaced by others under the same names: the warm cache
    recomputes the chunk (and the rerank scores) they are in and nothing else, and the
    numbers equal a run without a cache (the tiny model on a copy of the demo benchmark)."""
    data = tmp_path / "data"
    shutil.copytree(demo_benchmark, data)
    args = ["--dataset", "demo", "--data_dir", data, "--weights", weights, "--topk", 3,
            "--pipelines", "cvnet_global,cvnet_rerank", "--config.chunk_size=16"]
    cache = tmp_path / "cache"
    assert eval_main(*args, "--output", tmp_path / "first.json", "--cache_dir", cache) == 0
    gnd = pickle.loads((data / "demo" / "gnd_demo.pkl").read_bytes())
    names = gnd["imlist"]
    a, b, c = (data / "demo" / "jpg" / f"{names[i]}.jpg" for i in (1, 2, len(names) - 1))
    old_a = a.read_bytes()
    a.write_bytes(c.read_bytes())                 # chunk 0: two changed images
    b.write_bytes(old_a)
    chunks = {p: p.stat().st_mtime_ns for p in cache.glob("cvnet-db-*/chunk_*.npz")}
    assert len(chunks) == -(-len(names) // 16)
    out = tmp_path / "warm.json"
    assert eval_main(*args, "--output", out, "--cache_dir", cache) == 0
    redone = sorted(p.name for p, t in chunks.items() if p.stat().st_mtime_ns != t)
    assert redone == ["chunk_000000.npz"], redone
    assert eval_main(*args, "--output", tmp_path / "cold.json", "--cache_dir", "") == 0
    warm, cold = json.loads(out.read_text()), json.loads((tmp_path / "cold.json").read_text())
    first = json.loads((tmp_path / "first.json").read_text())
    for p in ("cvnet_global", "cvnet_rerank"):
        assert warm[p]["mAP"] == cold[p]["mAP"], p
    assert first["cvnet_global"]["mAP"] != cold["cvnet_global"]["mAP"]
    with np.load(tmp_path / "warm_ranks.npz") as w, np.load(tmp_path / "cold_ranks.npz") as c:
        for k in w.files:
            np.testing.assert_array_equal(w[k], c[k], err_msg=k)


def test_malformed_gnd(fails, weights, data_copy):
    path = data_copy / "roxford5k" / "gnd_roxford5k.pkl"
    gnd = pickle.loads(path.read_bytes())
    last = len(gnd["gnd"]) - 1
    del gnd["gnd"][last]["bbx"]
    path.write_bytes(pickle.dumps(gnd))
    fails(weights, data_copy, [f"gnd_roxford5k.pkl: gnd[{last}] (query "
                               f"'{gnd['qimlist'][last]}'): missing bbx"])
    gnd["gnd"][last]["bbx"] = [0, 0, 10, 10]
    n_db = len(gnd["imlist"])
    gnd["gnd"][0]["easy"] = [1, 2, n_db + 5]
    path.write_bytes(pickle.dumps(gnd))
    fails(weights, data_copy, ["gnd[0]", "'easy'", f"[0, {n_db})"])


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
    # the first two queries with the database images they name, renumbered
    keep = sorted({int(i) for g in gnd["gnd"][:2] for k in ("easy", "hard", "junk")
                   for i in g.get(k, ())})[:10]
    new = {old: j for j, old in enumerate(keep)}
    small = {"imlist": [gnd["imlist"][i] for i in keep], "qimlist": gnd["qimlist"][:2],
             "gnd": [{**g, **{k: [new[int(i)] for i in g.get(k, ()) if int(i) in new]
                              for k in ("easy", "hard", "junk")}} for g in gnd["gnd"][:2]]}
    for name in small["imlist"] + small["qimlist"]:
        shutil.copy(src / "jpg" / f"{name}.jpg", root / "jpg")
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(small))
    dis_dir = tmp_path / "r1m"
    (dis_dir / "jpg").mkdir(parents=True)
    names = [n for i, n in enumerate(gnd["imlist"]) if i not in new][:3]
    for name in names:
        shutil.copy(src / "jpg" / f"{name}.jpg", dis_dir / "jpg")
    (dis_dir / "revisitop1m.txt").write_text("".join(f"jpg/{n}.jpg\n" for n in names))
    # AMES (a random one on the tiny model's local features) reranks the top 4 of the
    # distractor-extended ranking, with the official protocol (a ranking per setting)
    import scvnet_jax as sj
    from scvnet_jax.models.ames import AMESArch, init
    arch = AMESArch(local_dim=sj.load(weights).arch.local_dim, model_dim=16, nhead=2,
                    num_encoder_layers=1, dim_feedforward=32)
    sj.rerank.ames.AMES(arch, init(arch, 0)).save(
        tmp_path / "ames", meta={"descriptors": {"query_len": 16, "db_len": 8},
                                 "rerank": {"k": 4}})
    out = tmp_path / "results.json"
    assert eval_main("--config", CONFIG, "--data_dir", tmp_path / "data", "--weights", weights,
                     "--pipelines", "cvnet_global,ames", "--first_stage", "cvnet_global",
                     "--ames_weights", tmp_path / "ames", "--distractors",
                     dis_dir / "revisitop1m.txt", "--output", out, "--cache_dir", "") == 0
    res = json.loads(out.read_text())
    n = len(keep) + 3
    assert res["cvnet_global"]["dataset"] == "roxford5k+R1M" and res["cvnet_global"]["n_db"] == n
    assert res["ames"]["protocol"] == "official"
    with np.load(tmp_path / "results_ranks.npz") as z:
        ranks = z["cvnet_global"]
        reranked = {k: z[k] for k in z.files if k.startswith("ames")}
    assert ranks.shape == (n, 2) and sorted(ranks[:, 0]) == list(range(n))
    assert reranked and all(r.shape == (n, 2) and sorted(r[:, 1]) == list(range(n))
                            for r in reranked.values())
    # only the shortlist changes order: the top 4 after each query's junk (+ easy for Hard)
    # is moved behind them, so the first 4 + max(junk + easy) rows
    depth = min(n, 4 + max(len(g.get("junk", ())) + len(g.get("easy", ()))
                           for g in small["gnd"]))
    for r in reranked.values():
        np.testing.assert_array_equal(r[depth:], ranks[depth:])
        assert all(set(r[:depth, q]) == set(ranks[:depth, q]) for q in range(2))


def test_queries_that_are_database_images_are_not_extracted_again(tiny_model, demo_benchmark,
                                                                  monkeypatch):
    """A folder set's queries are its database images (leave-one-out): their descriptors
    are the database rows, not a second extraction; a cropped query is still its own."""
    from scvnet_jax.engine import extract
    from scvnet_jax.evaluation import config, pipelines
    from scvnet_jax.images import ImageRef

    jpgs = sorted((demo_benchmark / "demo" / "jpg").glob("*.jpg"))[:5]
    db = [ImageRef(str(p)) for p in jpgs]
    queries = [ImageRef(str(jpgs[3])), ImageRef(str(jpgs[1]), (10.0, 10.0, 90.0, 80.0)), db[0]]
    cfg = config.default_config()
    cfg.cache_dir = ""
    seen, real = [], extract.extract
    monkeypatch.setattr(extract, "extract", lambda m, refs, *a, **k: seen.append(
        list(refs)) or real(m, refs, *a, **k))
    ctx = pipelines.Context(cfg, tiny_model, None, db, queries, {})
    for family in ("cvnet", "superglobal"):
        seen.clear()
        X, Q = ctx.descriptors(family)
        assert seen == [db, [queries[1]]], family
        np.testing.assert_array_equal(Q[[0, 2]], X[[3, 0]])
        assert not np.allclose(Q[1], X[1], atol=1e-3)    # the crop: another descriptor
        spec = extract.spec_of(family)
        np.testing.assert_allclose(Q[1], real(tiny_model, [queries[1]], spec)[0], atol=2e-6)
