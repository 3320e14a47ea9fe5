"""Stage-4 training (AMES): the pairs against their definition (labels, hard negatives,
the drawn numbers of descriptors, padding), the stream's determinism, pickling and
per-process split, the loss's gradient path (training-mode forward), bit-identical SIGKILL
resume with the bank reused, the model directory it exports and the reranker reading it,
distillation of a binarized student (configs/ames_demo.py:tiny on the tiny CVNet).
The model itself is checked against the official code in tests/rerank/test_ames.py."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

import scvnet_jax as sj


class _TS:
    """A stand-in training set: 5 classes of 4 images (labels sorted, as TFDS sets are)."""
    name = "fake"
    num_examples = 20
    class_offsets = np.arange(0, 21, 4)

    def labels(self):
        return np.arange(20) // 4


def _bank(path, topk=6, dim=8, seed=0):
    from scvnet_jax import files
    from scvnet_jax.training.ames import BANK_CHUNK

    rng = np.random.default_rng(seed)
    path.mkdir()
    desc = rng.normal(size=(20, topk, dim)).astype(np.float16)
    length = rng.integers(2, topk + 1, size=20).astype(np.int32)
    for i, n in enumerate(length):
        desc[i, n:] = 0
    assert 20 <= BANK_CHUNK
    files.atomic_save_npz(path / "local_00000.npz", desc=desc, length=length)
    labels = np.arange(20) // 4
    hard = np.stack([[j for j in range(20) if labels[j] != labels[i]][:3] for i in range(20)])
    np.save(path / "labels.npy", labels)
    np.save(path / "hard.npy", hard.astype(np.int32))
    (path / "done.json").write_text("{}")
    return desc, length, labels, hard


def test_pairs_follow_their_definition(tmp_path):
    from ml_collections import ConfigDict

    from scvnet_jax.training.ames import PairTransform, pair_dataset

    desc, length, labels, hard = _bank(tmp_path / "bank")
    t = PairTransform(_TS(), tmp_path / "bank", (2, 5), (3, 6), 0.5, (1.0, 1.0), 10, 4)
    rng = np.random.default_rng(0)
    seen = {0: 0, 1: 0}
    for pos in range(200):
        index = pos % 20
        out = t.random_map((pos, index), rng)
        assert out["q"].shape == (5, 8) and out["d"].shape == (6, 8)
        assert out["q_mask"].shape == (5,) and out["d_mask"].shape == (6,)
        nq, nd = int((~out["q_mask"]).sum()), int((~out["d_mask"]).sum())
        assert 2 <= nq <= min(5, length[index]) and nd >= 1
        # the strongest rows first, exactly the bank's; padding rows are zero and masked
        np.testing.assert_array_equal(out["q"][:nq], desc[index, :nq].astype(np.float32))
        assert not out["q_mask"][:nq].any() and out["q_mask"][nq:].all()
        assert not out["q"][nq:].any() and not out["d"][nd:].any()
        match = [j for j in range(20) if length[j] >= nd and np.array_equal(
            desc[j, :nd].astype(np.float32), out["d"][:nd])]
        assert match, "the candidate is a bank image"
        j = match[0]
        y = int(out["label"])
        seen[y] += 1
        assert y == int(labels[j] == labels[index])
        if y == 0:   # hard_ratio 1: every negative from the query's hard-negative row
            assert bool(out["hard"]) and j in hard[index]
        else:
            assert j != index                  # another image of the landmark
    assert seen[0] > 50 and seen[1] > 50
    # pickles without the loaded bank (grain workers get a copy)
    t.bank()
    again = pickle.loads(pickle.dumps(t))
    assert again._bank is None
    a = again.random_map((3, 3), np.random.default_rng(1))
    b = t.random_map((3, 3), np.random.default_rng(1))
    np.testing.assert_array_equal(a["d"], b["d"])
    # the stream: deterministic, and each process reads its part of every global batch
    cfg = ConfigDict({"ames": {"query_len": (2, 5), "db_len": (3, 6), "positive_fraction": 0.5,
                               "hard_ratio": (0.5, 0.5)}, "total_steps": 10,
                      "batch_size": 8, "seed": 1})
    ds = pair_dataset(_TS(), tmp_path / "bank", cfg)
    halves = [pair_dataset(_TS(), tmp_path / "bank", cfg, process_index=i,
                           process_count=2)[3] for i in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["d"] for h in halves]), ds[3]["d"])
    np.testing.assert_array_equal(ds[3]["label"], pair_dataset(_TS(), tmp_path / "bank",
                                                                cfg)[3]["label"])


def test_same_image_positives_are_two_views_of_the_query_image(tmp_path):
    """`ames.same_image`: that fraction of positives pairs two different bank views of the
    query's own image (content they surely share); the rest as before."""
    from scvnet_jax import files
    from scvnet_jax.training.ames import PairTransform

    rng = np.random.default_rng(0)
    bank = tmp_path / "bank"
    bank.mkdir()
    desc = rng.normal(size=(20, 3, 5, 4)).astype(np.float16)      # 3 views per image
    files.atomic_save_npz(bank / "local_00000.npz", desc=desc,
                          length=np.full((20, 3), 5, np.int32))
    labels = np.arange(20) // 4
    np.save(bank / "labels.npy", labels)
    np.save(bank / "hard.npy", np.full((20, 1), -1, np.int32))
    (bank / "done.json").write_text("{}")

    def source(rows):           # (image, view) of a pair side's rows
        return [(i, v) for i in range(20) for v in range(3)
                if np.array_equal(desc[i, v].astype(np.float32), rows)]

    for frac, expect in ((1.0, "same"), (0.0, "other")):
        t = PairTransform(_TS(), bank, (5, 5), (5, 5), 1.0, (0.0, 0.0), 10, 4,
                          same_image=frac)
        for pos in range(40):
            out = t.random_map((pos, pos % 20), rng)
            (qi, qv), = source(out["q"])
            (di, dv), = source(out["d"])
            assert int(out["label"]) == 1 and qi == pos % 20 and labels[di] == labels[qi]
            if expect == "same":
                assert di == qi and dv != qv
            else:
                assert di != qi


def test_matching_init_starts_attention_as_descriptor_matching(tmp_path):
    """`ames.init = "matching"`: remap_local's projection is the bank descriptors' principal
    directions (centred), every attention's query/key projection the identity; the rest is
    the official initialisation. A binarized model gets the directions as its W."""
    import jax

    from scvnet_jax.training.ames import (Bank, ames_arch, init_state, matching_init,
                                          pca_projection)
    from scvnet_jax.training.config import default_config

    desc, length, _, _ = _bank(tmp_path / "bank", topk=6, dim=8)
    kernel, bias = pca_projection(Bank(tmp_path / "bank"), 20, 4)
    rows = np.concatenate([desc[i, :n].astype(np.float64) for i, n in enumerate(length)])
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    cov = np.cov(rows.T, bias=True)
    w, v = np.linalg.eigh(cov)
    top = v[:, ::-1][:, :4]
    assert kernel.shape == (8, 4) and bias.shape == (4,)
    np.testing.assert_allclose(np.abs(kernel.T @ top), np.eye(4), atol=1e-5)
    np.testing.assert_allclose(bias, -rows.mean(0) @ kernel, atol=1e-6)
    # a projection wider than the descriptors keeps them all, the rest zero
    wide, _ = pca_projection(Bank(tmp_path / "bank"), 20, 10)
    assert wide.shape == (8, 10) and not wide[:, 8:].any()

    cfg = default_config()
    cfg.ames.update(model_dim=4, nhead=2, num_encoder_layers=2, dim_feedforward=8,
                    query_len=(3, 3), db_len=(3, 3), topk=6)
    for binarized in (False, True):
        cfg.ames.binarized = binarized
        arch = ames_arch(cfg, 8)
        start = init_state(cfg, arch, jax.random.PRNGKey(0)).params
        p = matching_init(start, arch, kernel, bias)
        assert jax.tree.structure(p) == jax.tree.structure(start)
        if binarized:
            np.testing.assert_array_equal(p["remap_local_0"]["W"], kernel)
        else:
            np.testing.assert_array_equal(p["remap_local_0"]["kernel"], kernel)
            np.testing.assert_array_equal(p["remap_local_0"]["bias"], bias)
        for name, layer in p["decoder"].items():
            for att in ("self_attn", "cross_attn"):
                w = np.asarray(layer[att]["in_proj_weight"])
                np.testing.assert_array_equal(w[:4], np.eye(4))
                np.testing.assert_array_equal(w[4:8], np.eye(4))
                np.testing.assert_array_equal(
                    w[8:], np.asarray(start["decoder"][name][att]["in_proj_weight"])[8:])
        np.testing.assert_array_equal(p["classifier"]["kernel"], start["classifier"]["kernel"])


def test_train_step_learns_a_separable_toy_task():
    """The step (training-mode forward, BCE, AdamW) separates pairs whose descriptors share
    a direction from pairs that do not, and metrics are consistent."""
    import jax
    from ml_collections import ConfigDict

    from scvnet_jax.training.ames import ames_arch, init_state, make_train_step
    from scvnet_jax.training.config import default_config

    cfg = default_config()
    cfg.ames.update(model_dim=16, nhead=2, num_encoder_layers=1, dim_feedforward=32,
                    query_len=(6, 6), db_len=(6, 6), topk=6)
    cfg.optimizer.update(name="adamw", lr=1e-3, warmup_steps=5, weight_decay=0.0)
    cfg.total_steps = 300
    arch = ames_arch(cfg, 8)
    state = init_state(cfg, arch, jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(cfg, arch))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8))

    def batch(n=32):
        qc = rng.integers(0, 6, n)
        y = rng.random(n) < 0.5
        dc = np.where(y, qc, (qc + rng.integers(1, 6, n)) % 6)
        q = centres[qc][:, None] + 0.1 * rng.normal(size=(n, 6, 8))
        d = centres[dc][:, None] + 0.1 * rng.normal(size=(n, 6, 8))
        m = np.zeros((n, 6), bool)
        m[:, 4:] = rng.random((n, 2)) < 0.5
        return ConfigDict({"q": q.astype(np.float32), "q_mask": m, "d": d.astype(np.float32),
                           "d_mask": m[::-1].copy(), "label": y.astype(np.int32),
                           "hard": np.zeros(n, bool)}).to_dict()

    losses, accuracy = [], []
    for _ in range(300):
        state, metrics = step(state, batch())
        losses.append(float(metrics["loss"]))
        accuracy.append(float(metrics["accuracy"]))
    assert bool(metrics["finite"]) and int(state.step) == 300
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5]) and np.mean(accuracy[-20:]) > 0.85


@pytest.fixture(scope="module")
def tiny_ames_run(tmp_path_factory, run_train, demo_tfds, tiny_model_dir):
    work = tmp_path_factory.mktemp("ames") / "w"
    r = run_train(work, f"--config.ames.model={tiny_model_dir}", data_dir=demo_tfds,
                  config="ames_demo.py:tiny")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work


@pytest.mark.slow
def test_sigkill_resume_is_exact_and_exports_an_ames(tmp_path, run_train, demo_tfds,
                                                     tiny_model_dir, tiny_ames_run,
                                                     kill_at_checkpoint,
                                                     assert_same_checkpoint):
    """Killed right after checkpoint 4 and rerun: bit-identical to the uninterrupted run.
    The killed run starts from a copy of the first run's bank (reused, not rebuilt)."""
    work = tmp_path / "killed"
    work.mkdir()
    shutil.copytree(tiny_ames_run / "ames_bank", work / "ames_bank")
    args = (f"--config.ames.model={tiny_model_dir}",)
    proc = run_train(work, *args, data_dir=demo_tfds, config="ames_demo.py:tiny", wait=False)
    kill_at_checkpoint(proc, work / "checkpoints" / "4")
    out = proc.stdout.read() if proc.stdout else ""
    assert "ames bank" not in out                       # the copied bank was used
    resumed = run_train(work, *args, data_dir=demo_tfds, config="ames_demo.py:tiny")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_checkpoint(tiny_ames_run, work, 8)
    model = sj.rerank.ames.load(work / "model")
    local_dim = sj.load(tiny_model_dir).arch.local_dim
    assert model.arch.model_dim == 16 and model.arch.local_dim == local_dim
    meta = json.loads((work / "model" / "config.json").read_text())
    assert meta["kind"] == "ames" and meta["meta"]["first_stage"] == "cvnet_global"
    assert sj.rerank.ames.settings_of(model)["db_len"] == 8
    recs = [json.loads(ln) for ln in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 6, 8]
    assert all(np.isfinite(r["loss"]) for r in recs)
    # the bank: every training image's top-8 local descriptors, as the engine extracts them,
    # for the whole image and one augmented view of it
    from scvnet_jax.data.sources import open_or_build, Records
    from scvnet_jax.engine import local
    with np.load(work / "ames_bank" / "local_00000.npz") as z:
        assert z["desc"].dtype == np.float16 and z["desc"].shape[1:] == (2, 8, local_dim)
        assert (z["length"] == 8).all()
        whole = z["desc"][:2, 0].astype(np.float32)
        assert not np.array_equal(z["desc"][:2, 1], z["desc"][:2, 0])
    ts = open_or_build("demo_landmarks", demo_tfds)
    ims = [Records(ts).record(i)[0] for i in range(2)]
    want = local.describe_local(sj.load(tiny_model_dir), ims, topk=8, dtype=np.float32)
    np.testing.assert_allclose(whole, want.desc, atol=2e-3 * np.abs(want.desc).max())


@pytest.mark.slow
def test_binarized_student_distils_from_a_teacher(tmp_path, run_train, demo_tfds,
                                                  tiny_model_dir, tiny_ames_run):
    """A binarized student trained with the tiny run's model as its teacher: the teacher's
    term is in the loss, the export is a dist model whose codes pack to bits."""
    work = tmp_path / "dist"
    work.mkdir()
    shutil.copytree(tiny_ames_run / "ames_bank", work / "ames_bank")
    r = run_train(work, f"--config.ames.model={tiny_model_dir}", "--config.ames.binarized=True",
                  f"--config.ames.teacher={tiny_ames_run / 'model'}",
                  data_dir=demo_tfds, config="ames_demo.py:tiny")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(ln) for ln in (work / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_distill"] > 0 and r["loss"] > r["loss_bce"] for r in recs)
    model = sj.rerank.ames.load(work / "model")
    assert model.arch.binarized and sj.rerank.ames.settings_of(model)["lamb"] == 0.85


def test_stage4_needs_a_retrieval_model(run_train, tmp_path, demo_tfds, one_error_line):
    r = run_train(tmp_path / "w", data_dir=demo_tfds, config="ames_demo.py:tiny",
                  *["--config.ames.model="])
    assert r.returncode == 2
    one_error_line(r.stderr, "the ames stage needs --config.ames.model")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("field, value, message", [
    ("init", "pca", "config.ames.init = 'pca': expected one of ('random', 'matching')"),
    ("same_image", 1.5, "config.ames.same_image = 1.5: expected a probability"),
    ("same_image", 0.5, "needs two views of each image in the bank"),
    ("tune_mix", True, "config.ames.tune_mix = True chooses mix on held-out classes: it "
                       "needs config.ames.holdout_classes >= 1"),
])
def test_stage4_config_errors(field, value, message):
    from scvnet_jax.errors import ConfigError
    from scvnet_jax.training.ames import check_config
    from scvnet_jax.training.config import default_config

    cfg = default_config()
    cfg.stage, cfg.ames.model, cfg.ames.bank_views = "ames", "demo", 1
    cfg.ames[field] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_config(cfg)


def test_step_adds_the_chamfer_logit():
    import jax

    from scvnet_jax.training.ames import ames_arch, init_state, make_train_step
    from scvnet_jax.training.config import default_config

    rng = np.random.default_rng(0)
    n = 32
    y = (rng.random(n) < 0.5).astype(np.int32)
    batch = {"q": rng.normal(size=(n, 6, 8)).astype(np.float32),
             "q_mask": np.zeros((n, 6), bool),
             "d": rng.normal(size=(n, 6, 8)).astype(np.float32),
             "d_mask": np.zeros((n, 6), bool), "label": y, "hard": np.zeros(n, bool),
             "chamfer": np.where(y == 1, 0.9, 0.5).astype(np.float32)}

    def first_loss(a, c):
        cfg = default_config()
        cfg.ames.update(model_dim=16, nhead=2, num_encoder_layers=1, dim_feedforward=32,
                        query_len=(6, 6), db_len=(6, 6), topk=6, chamfer_logit=a,
                        chamfer_center=c)
        cfg.optimizer.update(name="adamw", lr=1e-3, warmup_steps=5, weight_decay=0.0)
        arch = ames_arch(cfg, 8)
        state = init_state(cfg, arch, jax.random.PRNGKey(0))
        _, metrics = jax.jit(make_train_step(cfg, arch))(state, batch)
        return float(metrics["loss"]), float(metrics["accuracy"])

    plain, plain_acc = first_loss(0.0, 0.0)
    on_top, on_top_acc = first_loss(40.0, 0.7)       # logit + 40 x (+-0.2): +-8
    assert on_top < 0.1 < plain and on_top_acc == 1.0 > plain_acc


def test_pairs_carry_their_chamfer_score(tmp_path):
    from scvnet_jax.training.ames import PairTransform, pair_chamfer
    _bank(tmp_path / "bank")
    t = PairTransform(_TS(), tmp_path / "bank", (2, 6), (2, 6), 0.5, (0.5, 0.5), 10, 4,
                      chamfer_logit=10.0)
    rng = np.random.default_rng(0)
    for i in range(8):
        p = t.random_map((i, i % 20), rng)
        assert p["chamfer"] == pair_chamfer(p["q"], p["q_mask"], p["d"], p["d_mask"])
    plain = PairTransform(_TS(), tmp_path / "bank", (2, 6), (2, 6), 0.5, (0.5, 0.5), 10, 4)
    assert "chamfer" not in plain.random_map((0, 0), rng)


def test_tune_chooses_lamb_temp_and_mix_on_the_held_out_classes(tmp_path):
    """`tune` on a bank's last 2 classes: a setting of its grid, never below the first
    stage (lamb 1 is in the grid), chamfer's best reported on the same split, and with
    mixes (0,) the official scoring only."""
    import jax

    from scvnet_jax.training.ames import MIXES, ames_arch, init_state, tune
    from scvnet_jax.training.config import default_config

    _bank(tmp_path / "bank", topk=6, dim=8)
    rng = np.random.default_rng(0)
    g = rng.normal(size=(20, 4)).astype(np.float32)
    np.save(tmp_path / "bank" / "global.npy", g / np.linalg.norm(g, axis=1, keepdims=True))
    cfg = default_config()
    cfg.ames.update(model_dim=16, nhead=2, num_encoder_layers=1, dim_feedforward=32)
    arch = ames_arch(cfg, 8)
    params = jax.tree.map(np.asarray, init_state(cfg, arch, jax.random.PRNGKey(0)).params)
    out = tune(tmp_path / "bank", arch, params, _TS(), 2, 100, MIXES, 5.0, 0.5)
    assert (out["queries"], out["database"]) == (4, 4)
    assert out["mix"] in MIXES and out["mAP"] >= out["first_stage"] - 1e-12
    assert out["chamfer"] >= out["first_stage"] - 1e-12
    assert tune(tmp_path / "bank", arch, params, _TS(), 2, 100)["mix"] == 0.0
