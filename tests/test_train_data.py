"""Training data: the demo set and benchmark, the GLDv2-clean builder on a fake tree, the
grain pipeline (pairs, determinism, resume, pickling), and bad input."""
from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from scvnet_jax.data import builders, demo, training
from scvnet_jax.data.revisitop import InputError, load_dataset


def test_demo_train_and_benchmark_photos_are_disjoint():
    demo.check_disjoint()
    train = {p for i in demo.instances(demo.TRAIN_PHOTOS) for p in i.photos}
    bench = {p for i in demo.instances(demo.BENCHMARK_PHOTOS) for p in i.photos}
    assert train and bench and not train & bench
    with pytest.raises(AssertionError, match="motorcycle_left"):
        demo.check_disjoint(["motorcycle_right.png"], ["motorcycle_left.png"])


def test_demo_benchmark_is_deterministic_and_loads(tmp_path):
    a = demo.build_benchmark(tmp_path / "a")
    b = demo.build_benchmark(tmp_path / "b")
    assert (a / "gnd_demo.pkl").read_bytes() == (b / "gnd_demo.pkl").read_bytes()
    for name in sorted(p.name for p in (a / "jpg").iterdir())[::37]:
        assert (a / "jpg" / name).read_bytes() == (b / "jpg" / name).read_bytes()
    ds = load_dataset(tmp_path / "a", "demo")
    n_inst = len(demo.instances(demo.BENCHMARK_PHOTOS))
    assert ds.n_queries == n_inst and ds.n_db == n_inst * 7
    for g in ds.gnd:  # every database image belongs to exactly one query's lists
        assert len(g["easy"]) == 3 and len(g["hard"]) == 3 and len(g["junk"]) == 1
    all_db = np.concatenate([np.concatenate([g["easy"], g["hard"], g["junk"]]) for g in ds.gnd])
    assert sorted(all_db.tolist()) == list(range(ds.n_db))


def test_demo_photo_hash_is_checked(monkeypatch):
    with pytest.raises(InputError, match="SHA-256"):
        demo.read_photo("astronaut.png",
                        demo.BENCHMARK_PHOTOS["astronaut.png"]._replace(sha="0" * 16))


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    builders.prepare("demo", d)
    return training.open_training_set("demo_landmarks", d)


def test_demo_builder_classes_are_contiguous(demo_set):
    ts = demo_set
    assert ts.num_classes == len(demo.train_instance_names()) == 72
    assert ts.num_examples == 72 * demo.TRAIN_VIEWS
    src = ts.source()
    for c in (0, 17, 71):
        lo, hi = ts.class_offsets[c], ts.class_offsets[c + 1]
        assert {int(src[i]["label"]) for i in range(lo, hi)} == {c}


def test_pipeline_pairs_determinism_and_resume(demo_set):
    ds = training.dataset(demo_set, training.Augment(size=48), global_batch=8, seed=3)
    b0 = ds[0]
    assert b0["image"].shape == (8, 48, 48, 3) and b0["image"].dtype == np.uint8
    assert b0["positive"].shape == (8, 48, 48, 3) and b0["label"].dtype == np.int32
    again = training.dataset(demo_set, training.Augment(size=48), global_batch=8, seed=3)[0]
    assert all(np.array_equal(b0[k], again[k]) for k in b0)
    # per-process slices of one global stream: disjoint, and together the whole batch
    halves = [training.dataset(demo_set, training.Augment(size=48), global_batch=8, seed=3,
                               process_index=i, process_count=2)[0]["label"] for i in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 4
    it = training.iterator(ds, threads=2, prefetch=2)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = next(it)
    it2 = training.iterator(ds, threads=2, prefetch=2)
    it2.set_state(state)
    got = next(it2)
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_transform_pickles_without_open_source(demo_set):
    t = training.PairTransform(demo_set, training.Augment(size=32))
    t.random_map(0, np.random.default_rng(0))   # opens the source
    t2 = pickle.loads(pickle.dumps(t))
    assert t2._source is None
    out = t2.random_map(5, np.random.default_rng(0))
    assert out["image"].shape == (32, 32, 3) and int(out["label"]) == 0


def test_positive_is_another_image_of_the_class(demo_set, monkeypatch):
    src = demo_set.source()
    monkeypatch.setattr(training, "augment", lambda im, a, rng: im)  # look at the raw pair
    t = training.PairTransform(demo_set, training.Augment())
    stored = {i: training.decode(src[i]["image"], "") for i in range(24)}
    seen = set()
    for seed in range(8):
        out = t.random_map(3, np.random.default_rng(seed))
        assert np.array_equal(out["image"], stored[3])
        matches = [i for i, im in stored.items()
                   if im.shape == out["positive"].shape and np.array_equal(im, out["positive"])]
        assert len(matches) == 1 and matches[0] != 3 and matches[0] < 12  # same class (0..11)
        seen.add(matches[0])
    assert len(seen) > 2
    same = training.PairTransform(demo_set, training.Augment(), positive="same_image")
    assert np.array_equal(same.random_map(3, np.random.default_rng(0))["positive"], stored[3])


# --- GLDv2-clean ---------------------------------------------------------------------

def fake_gldv2(root, rows, header="landmark_id,images", skip=()):
    """A GLDv2-clean manual folder: train_clean.csv and train/a/b/c/<id>.jpg."""
    import cv2
    root.mkdir(parents=True, exist_ok=True)
    lines = [header] + [f"{lid},{' '.join(ids)}" for lid, ids in rows]
    (root / "train_clean.csv").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(0)
    for _, ids in rows:
        for i in ids:
            if i in skip:
                continue
            p = builders.gldv2_image_path(root / "train", i)
            p.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(p), rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    return root


ROWS = [(907, ["f00ba4aa", "f00ba4ab"]), (12, ["0a1b2c3d", "0a1b2c3e", "0a1b2c3f"]),
        (50, ["1234abcd"])]


def test_gldv2_builder_on_fake_tree(tmp_path):
    manual = fake_gldv2(tmp_path / "manual", ROWS)
    b = builders.prepare("gldv2_clean", tmp_path / "tfds", manual)
    assert b.info.metadata["landmark_ids"] == [12, 50, 907]   # labels by sorted landmark id
    ts = training.open_training_set("gldv2_clean", tmp_path / "tfds")
    assert ts.num_classes == 3 and ts.num_examples == 6
    assert ts.class_offsets.tolist() == [0, 3, 4, 6]
    src = ts.source()
    assert [src[i]["image_id"].decode() for i in range(6)] == [
        "0a1b2c3d", "0a1b2c3e", "0a1b2c3f", "1234abcd", "f00ba4aa", "f00ba4ab"]
    stored = builders.gldv2_image_path(manual / "train", "1234abcd").read_bytes()
    assert src[3]["image"] == stored                          # original JPEG bytes
    batch = training.dataset(ts, training.Augment(size=32), global_batch=4, seed=0)[0]
    assert batch["image"].shape == (4, 32, 32, 3)


@pytest.mark.parametrize("case,match", [
    ("missing", r"1 image file\(s\) listed in train_clean.csv are missing: .*0a1b2c3e.jpg"),
    ("columns", r"columns \['landmark_id', 'images', 'url'\], expected exactly "
                r"\['landmark_id', 'images'\]"),
    ("empty", r"train_clean.csv:4: landmark 50 has no images \(an empty class\)"),
])
def test_gldv2_bad_input(tmp_path, case, match):
    rows = [(lid, ([] if case == "empty" and lid == 50 else ids)) for lid, ids in ROWS]
    header = "landmark_id,images,url" if case == "columns" else "landmark_id,images"
    manual = fake_gldv2(tmp_path / "m", rows, header,
                        skip={"0a1b2c3e"} if case == "missing" else ())
    with pytest.raises(InputError, match=match):
        builders.prepare("gldv2_clean", tmp_path / "tfds", manual)
    assert not (tmp_path / "tfds" / "gldv2_clean" / "1.0.0" / "dataset_info.json").exists()


def test_builder_cli_reports_one_error_line(tmp_path):
    manual = fake_gldv2(tmp_path / "m", ROWS, skip={"f00ba4aa"})
    r = subprocess.run([sys.executable, "-m", "scvnet_jax.data.build", "gldv2_clean",
                        "--data_dir", str(tmp_path / "tfds"), "--manual_dir", str(manual)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "f00ba4aa.jpg" in errors[0], r.stderr[-2000:]


def test_unprepared_set_names_the_build_command(tmp_path):
    with pytest.raises(InputError, match="python -m scvnet_jax.data.build gldv2_clean"):
        training.open_training_set("gldv2_clean", tmp_path)
