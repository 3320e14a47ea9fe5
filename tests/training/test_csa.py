"""Stage-3 training (CSA): the samples against their definition (the official dataset's),
the stream's determinism, pickling and resume, the bank's reuse, bit-identical SIGKILL
resume and the model directory it exports (configs/csa_demo.py:tiny on the tiny CVNet).
The loss and its gradients are checked against the official code in tests/rerank/test_csa.py."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

import scvnet_jax as sj


def _bank(path, n=40, d=8, seed=0):
    rng = np.random.default_rng(seed)
    desc = rng.normal(size=(n, d)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    nb = np.argsort(-(desc @ desc.T), axis=1, kind="stable").astype(np.int32)
    labels = (np.arange(n) // 5).astype(np.int32)
    np.savez(path, descriptors=desc, neighbours=nb, labels=labels)
    return desc, nb, labels


def test_samples_are_the_official_ones(tmp_path):
    from scvnet_jax.training.csa import SampleTransform, dataset

    desc, nb, labels = _bank(tmp_path / "bank.npz")
    t = SampleTransform(tmp_path / "bank.npz", topk=12, anchor_len=6)
    out = t.random_map(7, np.random.default_rng(0))
    assert out["sim"].shape == (12, 6) and out["target"].shape == (12,)
    rows, cols = nb[7, :12], nb[7, :6]
    full = desc[rows] @ desc[cols].T
    # row 0 stays the query (the image itself, its own nearest neighbour); the rest is a
    # permutation of the other rows, and each target follows its row
    np.testing.assert_allclose(out["sim"][0], full[0], atol=1e-6)
    order = [int(np.argmin(np.abs(full - r).sum(1))) for r in out["sim"]]
    assert order[0] == 0 and sorted(order) == list(range(12))
    np.testing.assert_array_equal(out["target"], labels[rows][order] == labels[7])
    # pickles without the loaded bank (grain workers get a copy)
    again = pickle.loads(pickle.dumps(t))
    assert again._bank is None
    np.testing.assert_array_equal(again.random_map(7, np.random.default_rng(0))["sim"],
                                  out["sim"])
    # the stream: deterministic, and each process reads its part of every global batch
    ds = dataset(tmp_path / "bank.npz", 40, 12, 6, global_batch=8, seed=1)
    halves = [dataset(tmp_path / "bank.npz", 40, 12, 6, global_batch=8, seed=1,
                      process_index=i, process_count=2)[3] for i in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["sim"] for h in halves]), ds[3]["sim"])


def test_centred_row_standardised_samples_are_what_inference_scores(tmp_path):
    """csa.center / csa.affinity_norm: a training sample's affinities (the query's row and
    the set of rows) are the features a model with that preprocessing computes at test
    time for the same query and neighbours (a database without the query)."""
    from scvnet_jax.models import csa as csa_model
    from scvnet_jax.training.csa import SampleTransform, bank_mean

    desc, nb, _ = _bank(tmp_path / "bank.npz")
    t = SampleTransform(tmp_path / "bank.npz", topk=12, anchor_len=6, center=True,
                        affinity_norm="row")
    out = t.random_map(7, np.random.default_rng(0))["sim"]
    arch = csa_model.CSAArch(anchor_len=6, embed_dim=16, depth=1, num_heads=2)
    model = sj.rerank.csa.CSA(arch, csa_model.init(arch, 0), center=bank_mean(desc),
                              affinity_norm="row")
    X = desc[nb[7, 1:]]                               # the database, best first, no query
    ranks = np.arange(len(X))[:, None]
    test = model.features(X, desc[7:8], ranks, topk=11)[0]          # (1 + 11, 6)
    np.testing.assert_allclose(out[0], test[0], atol=1e-5)
    assert np.abs(out.mean(1)).max() < 1e-5 and np.allclose(out.std(1), 1, atol=1e-3)
    for row in out[1:]:
        assert np.abs(test[1:] - row).sum(1).min() < 1e-4
    plain = sj.rerank.csa.CSA(arch, model.variables)
    assert not np.allclose(plain.features(X, desc[7:8], ranks, topk=11)[0], test)
    with pytest.raises(Exception, match="affinity_norm must be one of"):
        sj.rerank.csa.CSA(arch, model.variables, affinity_norm="col")


@pytest.fixture(scope="module")
def tiny_csa_run(tmp_path_factory, run_train, demo_tfds, tiny_model_dir):
    work = tmp_path_factory.mktemp("csa") / "w"
    r = run_train(work, f"--config.csa.model={tiny_model_dir}", data_dir=demo_tfds,
                  config="csa_demo.py:tiny")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work


@pytest.mark.slow
def test_sigkill_resume_is_exact_and_exports_a_csa(tmp_path, run_train, demo_tfds,
                                                   tiny_model_dir, tiny_csa_run,
                                                   kill_at_checkpoint, assert_same_checkpoint):
    """Killed right after checkpoint 4 and rerun: bit-identical to the uninterrupted run.
    The killed run starts from a copy of the first run's bank (it is reused, not rebuilt:
    the bank is the same for both)."""
    work = tmp_path / "killed"
    work.mkdir()
    shutil.copy(tiny_csa_run / "csa_bank.npz", work / "csa_bank.npz")
    args = (f"--config.csa.model={tiny_model_dir}",)
    proc = run_train(work, *args, data_dir=demo_tfds, config="csa_demo.py:tiny", wait=False)
    kill_at_checkpoint(proc, work / "checkpoints" / "4")
    out = proc.stdout.read() if proc.stdout else ""
    assert "csa bank" not in out                       # the copied bank was used
    resumed = run_train(work, *args, data_dir=demo_tfds, config="csa_demo.py:tiny")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_checkpoint(tiny_csa_run, work, 8)
    csa = sj.rerank.csa.load(work / "model")
    assert csa.arch.anchor_len == 8 and csa.arch.embed_dim == 16
    meta = json.loads((work / "model" / "config.json").read_text())
    assert meta["kind"] == "csa" and meta["meta"]["first_stage"] == "cvnet_global"
    recs = [json.loads(ln) for ln in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 6, 8]
    assert all(np.isfinite(r["loss"]) and 0 < r["positives"] < 1 for r in recs)


def test_stage3_needs_a_retrieval_model(run_train, tmp_path, demo_tfds, one_error_line):
    r = run_train(tmp_path / "w", data_dir=demo_tfds, config="csa_demo.py:tiny",
                  *["--config.csa.model="])
    assert r.returncode == 2
    one_error_line(r.stderr, "the csa stage needs --config.csa.model")
    assert not (tmp_path / "w").exists()
