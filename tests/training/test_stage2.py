"""Stage-2 training (CVNet-Rerank): hard-negative mining against brute force (1 and 8
devices), Hide-and-Seek, the pair sampler and its curriculum, the bank's independence of
the process split, and resume across a bank refresh (configs/demo_rerank.py:tiny). The
shortened demo run's margin is tests/e2e/test_demo.py."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest


# --- the pieces --------------------------------------------------------------------------

def _brute_force_check(hard_negative_table):
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(53, 8)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    labels = np.repeat(np.arange(9), [1, 7, 6, 6, 6, 6, 6, 6, 9]).astype(np.int32)
    table = hard_negative_table(desc, labels, k=5, max_block=7 * 53)   # several blocks + pad
    sim = desc.astype(np.float64) @ desc.T.astype(np.float64)
    for i in range(len(desc)):
        others = np.flatnonzero(labels != labels[i])
        want = others[np.argsort(-sim[i, others], kind="stable")[:5]]
        np.testing.assert_array_equal(table[i], want)
    # fewer other-landmark images than k: padded with -1
    small = hard_negative_table(desc[:8], labels[:8], k=10)
    assert (small[0, :7] >= 0).all() and (small[0, 7:] == -1).all()   # class 0: one image
    assert set(small[1][small[1] >= 0]) == {0}


def test_hard_negative_table_matches_brute_force():
    from scvnet_jax.training.stage2 import hard_negative_table
    _brute_force_check(hard_negative_table)


def test_hard_negative_table_on_8_devices(fake_devices_env, repo):
    """The same check with the database split over 8 (fake CPU) devices: 53 rows, so the
    shards are padded, and the merge of the shards' candidates must keep exact order."""
    import inspect
    src = inspect.getsource(_brute_force_check)
    script = ("import jax, numpy as np\nassert jax.device_count() == 8\n"
              "from scvnet_jax.training.stage2 import hard_negative_table\n" + src +
              "\n_brute_force_check(hard_negative_table)\nprint('ok')\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=fake_devices_env(8), cwd=repo, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_hide_and_seek():
    from scvnet_jax.training.stage2 import hide_and_seek

    f = jnp.ones((4, 7, 5, 3))
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(hide_and_seek(f, 0.0, key), f)
    np.testing.assert_array_equal(hide_and_seek(f, 1.0, key), 0 * f)
    h = np.asarray(hide_and_seek(jnp.ones((64, 8, 8, 2)), 0.3, key, cell=2))
    assert (h[..., 0] == h[..., 1]).all()             # a cell hides all its channels
    blocks = h[..., 0].reshape(64, 4, 2, 4, 2)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # 2x2 blocks hide together
    assert 0.2 < 1 - h.mean() < 0.4


def test_pair_sampler_labels_and_curriculum(tmp_path, demo_tfds):
    from scvnet_jax.data import augment, sources
    from scvnet_jax.training import stage2

    ts = sources.open_training_set("demo_landmarks", str(demo_tfds))
    labels = ts.labels()
    n = ts.num_examples
    # a table whose "hard" negatives are recognisable: image i -> the 3 images after its class
    table = np.stack([(ts.class_offsets[labels[i] + 1] + np.arange(3)) % n for i in range(n)])
    np.save(tmp_path / "table.npy", table.astype(np.int32))
    aug = augment.Augment(size=32)
    sampling = stage2.PairSampling(positive_fraction=0.5, hard_ratio=(0.0, 1.0),
                                   curriculum_steps=10, global_batch=4)
    t = stage2.RerankPairTransform(ts, aug, sampling, tmp_path / "table.npy")
    t = pickle.loads(pickle.dumps(t))                 # grain workers receive a copy
    calls = []

    def fake_record(i):                                # no decoding; remembers what was read
        calls.append(int(i))
        return np.full((40, 50, 3), i % 256, np.uint8), int(labels[i])

    t.record = fake_record
    hard_by_step = {}
    for step in (0, 10):
        stats = []
        for k in range(400):
            rng = np.random.default_rng(k)
            idx = int(rng.integers(0, n))
            out = t.random_map((step * 4 + k % 4, idx), np.random.default_rng(1000 + k))
            assert out["query"].shape == (32, 32, 3) and out["candidate"].dtype == np.uint8
            stats.append((int(out["label"]), bool(out["hard"])))
        labs = np.array([s[0] for s in stats])
        assert 0.4 < labs.mean() < 0.6
        hard_by_step[step] = np.mean([h for lab, h in stats if lab == 0])
        assert not any(h for lab, h in stats if lab == 1)
    assert hard_by_step[0] == 0.0 and hard_by_step[10] == 1.0      # the ramp's two ends

    # positives share the query's landmark; negatives never do; hard ones come from the table
    seen = {"pos": 0, "neg": 0, "hard": 0}
    for k in range(300):
        calls.clear()
        idx = int(np.random.default_rng(k).integers(0, n))
        out = t.random_map((40 + k, idx), np.random.default_rng(k))
        q, c = calls[0], calls[-1]
        assert q == idx
        if out["label"] == 1:
            seen["pos"] += 1
            assert labels[c] == labels[q]
        else:
            seen["neg"] += 1
            assert labels[c] != labels[q]
            if out["hard"]:
                seen["hard"] += 1
                assert c in table[q]
    assert min(seen.values()) > 50, seen


def test_bank_does_not_depend_on_the_process_split(demo_tfds):
    """Each process describes every process_count-th image; together the processes cover
    every image once, with the augmentation the image gets in a single process."""
    from scvnet_jax.data import augment, sources
    from scvnet_jax.training import stage2

    ts = sources.open_training_set("demo_landmarks", str(demo_tfds))
    aug = augment.Augment(size=32)
    one = stage2.bank_dataset(ts, aug, version=1, batch=100, seed=0)
    whole = {int(i): im for b in one for i, im in zip(b["index"], b["image"])}
    assert sorted(whole) == list(range(ts.num_examples))
    parts = [stage2.bank_dataset(ts, aug, version=1, batch=48, seed=0, process_index=p,
                                 process_count=3) for p in range(3)]
    seen = []
    for ds in parts:
        for b in ds:
            for i, im in zip(b["index"], b["image"]):
                np.testing.assert_array_equal(im, whole[int(i)])
                seen.append(int(i))
    assert sorted(seen) == list(range(ts.num_examples))        # every image exactly once


# --- the command line --------------------------------------------------------------------

TINY = "demo_rerank.py:tiny"


@pytest.fixture(scope="module")
def tiny_stage1(tmp_path_factory, run_train, demo_tfds):
    """A tiny stage-1 model (its initialisation)."""
    root = tmp_path_factory.mktemp("stage1")
    r = run_train(root / "w", "--config.total_steps=0", data_dir=demo_tfds,
                  config="demo.py:tiny")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root / "w" / "model"


def test_stage2_needs_a_stage1_model(tmp_path, run_train, demo_tfds, one_error_line):
    r = run_train(tmp_path / "w", "--config.init_from=", data_dir=demo_tfds, config=TINY)
    assert r.returncode == 2
    one_error_line(r.stderr, "the cvnet_rerank stage needs --config.init_from")
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.slow
def test_stage2_sigkill_resume_is_exact_and_backbone_stays_frozen(
        tmp_path, tiny_stage1, run_train, demo_tfds, kill_at_checkpoint,
        assert_same_checkpoint):
    steps = ["--config.total_steps=20", "--config.checkpoint_every_steps=5",
             f"--config.init_from={tiny_stage1}", "--config.log_every_steps=2"]
    full = run_train(tmp_path / "full", *steps, data_dir=demo_tfds, config=TINY)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "full" / "hard_negatives").iterdir()) == [
        "v0.npy", "v1.npy", "v2.npy"]

    work = tmp_path / "killed"
    proc = run_train(work, *steps, data_dir=demo_tfds, config=TINY, wait=False)
    kill_at_checkpoint(proc, work / "checkpoints" / "10")   # past the bank refresh at 8
    resumed = run_train(work, *steps, data_dir=demo_tfds, config=TINY)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_checkpoint(tmp_path / "full", work, 20)

    import scvnet_jax as sj
    before, after = sj.load(tiny_stage1).variables, sj.load(tmp_path / "full" / "model").variables
    for c in ("params", "batch_stats"):       # backbone frozen, head trained
        for x, y in zip(jax.tree.leaves(before[c]["encoder_q"]),
                        jax.tree.leaves(after[c]["encoder_q"])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    changed = [not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(
        jax.tree.leaves(before["params"]["cv_learner"]),
        jax.tree.leaves(after["params"]["cv_learner"]))]
    assert all(changed)
    recs = [json.loads(ln) for ln in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(2, 21, 2))
    assert recs[0]["hide_prob"] < recs[-1]["hide_prob"]
    assert all(np.isfinite(r["loss"]) and "pairs_per_sec" in r for r in recs)
