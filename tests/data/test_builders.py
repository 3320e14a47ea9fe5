"""TFDS builders of the training sets: the demo set and GLDv2-clean on a fake tree, and
bad input."""
from __future__ import annotations

import numpy as np
import pytest

from scvnet_jax.data import builders, demo, sources
from scvnet_jax.errors import InputError


@pytest.fixture(scope="module")
def demo_set(demo_tfds):
    return sources.open_training_set("demo_landmarks", demo_tfds)


def test_demo_builder_classes_are_contiguous(demo_set):
    ts = demo_set
    assert ts.num_classes == len(demo.train_instance_names()) == 72
    assert ts.num_examples == 72 * demo.TRAIN_VIEWS
    src = ts.source()
    for c in (0, 17, 71):
        lo, hi = ts.class_offsets[c], ts.class_offsets[c + 1]
        assert {int(src[i]["label"]) for i in range(lo, hi)} == {c}


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
    assert b.info.metadata["small_classes"] == {"count": 1, "first": [50]}
    assert b.info.metadata["duplicates"] == {"count": 0, "first": []}
    ts = sources.open_training_set("gldv2_clean", tmp_path / "tfds")
    assert ts.num_classes == 3 and ts.num_examples == 6
    assert ts.class_offsets.tolist() == [0, 3, 4, 6]
    src = ts.source()
    assert [src[i]["image_id"].decode() for i in range(6)] == [
        "0a1b2c3d", "0a1b2c3e", "0a1b2c3f", "1234abcd", "f00ba4aa", "f00ba4ab"]
    stored = builders.gldv2_image_path(manual / "train", "1234abcd").read_bytes()
    assert src[3]["image"] == stored                          # original JPEG bytes
    from scvnet_jax.data.augment import Augment
    from scvnet_jax.training import stage1
    batch = stage1.dataset(ts, Augment(size=32), global_batch=4, seed=0)[0]
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


def test_gldv2_truncated_file_is_named(tmp_path):
    manual = fake_gldv2(tmp_path / "m", ROWS)
    path = builders.gldv2_image_path(manual / "train", "0a1b2c3e")
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(InputError, match=r"0a1b2c3e.jpg: truncated"):
        builders.prepare("gldv2_clean", tmp_path / "tfds", manual)


def test_gldv2_duplicates_and_one_image_classes_are_reported(tmp_path, capsys):
    """The published set is kept as it is; what a user should know is said."""
    from scvnet_jax.data import build

    manual = fake_gldv2(tmp_path / "m", ROWS)
    copy = builders.gldv2_image_path(manual / "train", "f00ba4ab")
    copy.write_bytes(builders.gldv2_image_path(manual / "train", "0a1b2c3d").read_bytes())
    assert build.main(["gldv2_clean", "--data_dir", str(tmp_path / "tfds"), "--manual_dir",
                       str(manual)]) == 0
    out = capsys.readouterr().out
    assert "1 class(es) with a single image (landmark ids 50)" in out
    assert "1 file(s) with the same content as another: f00ba4ab = 0a1b2c3d" in out


def test_builder_cli_reports_one_error_line(tmp_path, run_module, one_error_line):
    manual = fake_gldv2(tmp_path / "m", ROWS, skip={"f00ba4aa"})
    r = run_module("data.build", "gldv2_clean", "--data_dir", tmp_path / "tfds",
                   "--manual_dir", manual)
    assert r.returncode == 2
    one_error_line(r.stderr, "f00ba4aa.jpg")


@pytest.mark.parametrize("kind", ["demo", "gldv2_clean"])
def test_builder_data_dir_that_is_a_file_is_one_error_line(tmp_path, capsys, one_error_line,
                                                           kind):
    from scvnet_jax.data import build as build_cli

    manual = fake_gldv2(tmp_path / "m", ROWS)
    data = tmp_path / "tfds"
    data.mkdir()
    name = builders.BUILDERS[kind].name
    (data / name).write_text("")
    args = ["--manual_dir", str(manual)] if kind == "gldv2_clean" else []
    assert build_cli.main([kind, "--data_dir", str(data), *args]) == 2
    one_error_line(capsys.readouterr().err, f"{data / name} is a file")
    assert sorted(p.name for p in data.iterdir()) == [name]     # nothing written beside it


def test_unprepared_set_names_the_build_command(tmp_path):
    with pytest.raises(InputError, match="python -m scvnet_jax.data.build gldv2_clean"):
        sources.open_training_set("gldv2_clean", tmp_path)
