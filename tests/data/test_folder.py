"""Your own photos as a set (scvnet_jax.data.folder): a folder of class subfolders or a
path,label CSV -> ArrayRecord splits train/eval, the seeded split, bad input (one error
naming the files), rebuilds, and the held-out split as a "single"-protocol benchmark."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from scvnet_jax import metrics
from scvnet_jax.data import build as build_cli
from scvnet_jax.data import folder, sources
from scvnet_jax.errors import InputError

# 5 classes of 3 to 5 images (unequal, so that the class offsets say something).
SIZES = {"arch": 4, "bridge": 3, "castle": 5, "dome": 4, "tower": 3}


def jpeg(rng) -> bytes:
    """A 24x24 JPEG of random noise (distinct content per call)."""
    import cv2
    return cv2.imencode(".jpg", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))[1].tobytes()


def make_tree(root: Path, sizes=None, seed: int = 0) -> dict[str, str]:
    """root/<class>/<i>.jpg -> {image_id ("<class>/<i>.jpg"): class}."""
    rng = np.random.default_rng(seed)
    labels = {}
    for c, n in (sizes or SIZES).items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / c / f"{i}.jpg").write_bytes(jpeg(rng))
            labels[f"{c}/{i}.jpg"] = c
    return labels


def build(name, data_dir, **kw):
    return folder.build(name, data_dir, progress=False, workers=2, **kw)


def records(name, data_dir, split):
    """(TrainingSet, [(label, image_id, bytes)]) of a split, in stored order."""
    ts = sources.open_training_set(name, data_dir, split)
    src = ts.source()
    rows = [(int(r["label"]), r["image_id"].decode(), r["image"])
            for r in (src[i] for i in range(ts.num_examples))]
    return ts, rows


def snapshot(d: Path) -> dict:
    """{relative path: (bytes, mtime_ns)} of every file under d."""
    return {p.relative_to(d).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


# -- 1. folder and CSV -> the same set ---------------------------------------------------------

def test_folder_and_csv_build_the_same_set(tmp_path):
    photos = tmp_path / "photos"
    labels = make_tree(photos)
    ids = list(labels)[::-1]                                  # rows in no particular order
    (photos / "header.csv").write_text("path,label\n" + "".join(
        f"{i},{labels[i]}\n" for i in ids))
    # As Excel saves it: a UTF-8 byte-order mark before the header, CRLF line ends.
    (photos / "excel.csv").write_bytes(("\ufeffPath,Label\r\n" + "".join(
        f"{i},{labels[i]}\r\n" for i in ids)).encode("utf-8"))
    (tmp_path / "lists").mkdir()                              # paths relative to the CSV
    (tmp_path / "lists" / "plain.csv").write_text("".join(
        f"../photos/{i},{labels[i]}\n" for i in ids))
    data = tmp_path / "tfds"
    metas = {"from_folder": build("from_folder", data, manual_dir=photos),
             "from_header": build("from_header", data, csv_path=photos / "header.csv"),
             "from_excel": build("from_excel", data, csv_path=photos / "excel.csv"),
             "from_plain": build("from_plain", data, csv_path=tmp_path / "lists" / "plain.csv")}
    ref = metas["from_folder"]
    assert ref["reused"] is False and ref["notes"] == []
    assert ref["class_names"] == sorted(ref["class_names"])          # labels by sorted name
    assert ref["eval_class_names"] == sorted(ref["eval_class_names"])
    assert sorted(ref["class_names"] + ref["eval_class_names"]) == sorted(SIZES)
    layout = ("class_names", "eval_class_names", "class_offsets", "eval_class_offsets")
    stored = {}
    for name, meta in metas.items():
        assert {k: meta[k] for k in layout} == {k: ref[k] for k in layout}, name
        rows = []
        for split, names in (("train", meta["class_names"]), ("eval", meta["eval_class_names"])):
            ts, recs = records(name, data, split)
            assert ts.num_classes == len(names)
            off = ts.class_offsets
            assert off[0] == 0 and off[-1] == ts.num_examples and np.all(np.diff(off) > 0)
            assert off.tolist() == meta["class_offsets" if split == "train" else
                                        "eval_class_offsets"]
            for c in range(ts.num_classes):                   # each range is one class
                assert {lab for lab, _, _ in recs[off[c]:off[c + 1]]} == {c}
            for lab, image_id, data_bytes in recs:
                image_id = image_id.removeprefix("../photos/")
                assert names[lab] == labels[image_id], (name, image_id)
                assert data_bytes == (photos / image_id).read_bytes()   # original bytes
                rows.append((split, lab, image_id))
        assert sorted(i for _, _, i in rows) == sorted(labels)    # every image once
        stored[name] = rows
    assert stored["from_header"] == stored["from_excel"] == stored["from_plain"] \
        == stored["from_folder"]


# -- 2. the split ----------------------------------------------------------------------------

def test_holdout_classes_is_whole_classes_and_seeded(tmp_path):
    photos = tmp_path / "photos"
    make_tree(photos)
    a = build("set_a", tmp_path / "tfds", manual_dir=photos, eval_fraction=0.4, seed=3)
    b = build("set_b", tmp_path / "tfds", manual_dir=photos, eval_fraction=0.4, seed=3)
    assert len(a["eval_class_names"]) == 2                    # round(0.4 * 5)
    assert not set(a["class_names"]) & set(a["eval_class_names"])
    assert a["eval_class_offsets"][-1] == sum(SIZES[c] for c in a["eval_class_names"])
    assert (b["class_names"], b["eval_class_names"], b["fingerprint"]) == (
        a["class_names"], a["eval_class_names"], a["fingerprint"])   # same seed, same split

    # Another seed, with enough classes: another split (numpy's default_rng, fixed values).
    many = [folder.Photo(Path(f"c{c:02d}/{i}.jpg"), f"c{c:02d}/{i}.jpg", f"c{c:02d}")
            for c in range(20) for i in range(3)]
    s0 = folder.split(many, 0.25, "classes", 0)
    assert s0 == folder.split(many, 0.25, "classes", 0)
    assert s0 != folder.split(many, 0.25, "classes", 1)
    held = {many[i].label for i in s0[1]}
    assert len(held) == 5 and not held & {many[i].label for i in s0[0]}


def test_holdout_images_keeps_two_of_every_class_in_train(tmp_path):
    photos = tmp_path / "photos"
    sizes = {"arch": 2, "bridge": 3, "castle": 4, "dome": 5, "tower": 6}
    labels = make_tree(photos, sizes)
    meta = build("by_images", tmp_path / "tfds", manual_dir=photos, eval_fraction=0.6,
                 holdout="images", seed=1)
    assert meta["class_names"] == sorted(sizes)               # every class trains
    _, train = records("by_images", tmp_path / "tfds", "train")
    _, held = records("by_images", tmp_path / "tfds", "eval")
    n_train = {c: sum(meta["class_names"][lab] == c for lab, _, _ in train) for c in sizes}
    n_held = {c: sum(meta["eval_class_names"][lab] == c for lab, _, _ in held) for c in sizes}
    # min(floor(0.6 * n + 0.5), n - 2) held out of each class of n
    assert n_held == {"arch": 0, "bridge": 1, "castle": 2, "dome": 3, "tower": 4}
    assert n_train == {"arch": 2, "bridge": 2, "castle": 2, "dome": 2, "tower": 2}
    assert meta["eval_class_names"] == ["bridge", "castle", "dome", "tower"]
    assert not {i for _, i, _ in train} & {i for _, i, _ in held}
    assert len(train) + len(held) == len(labels)


def test_no_holdout_and_bad_split_options(tmp_path):
    photos = tmp_path / "photos"
    make_tree(photos)
    data = tmp_path / "tfds"
    meta = build("no_eval", data, manual_dir=photos, eval_fraction=0)
    assert meta["eval_class_names"] == [] and meta["eval_class_offsets"] == [0]
    with pytest.raises(InputError, match="no split 'eval'; it has train"):
        sources.open_training_set("no_eval", data, "eval")     # (TFDS has no empty splits)
    assert sources.open_training_set("no_eval", data, "train").num_examples == sum(
        SIZES.values())
    with pytest.raises(InputError, match=r"no held-out images \(built with --eval_fraction "
                                         r"0\); rebuild it under another --name"):
        folder.open_benchmark(f"folder:{data}/no_eval", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()

    with pytest.raises(InputError, match=r"--eval_fraction 1.0: expected a number in \[0, 1\)"):
        build("bad_fraction", data, manual_dir=photos, eval_fraction=1.0)
    with pytest.raises(InputError, match="--holdout 'pixels': expected one of classes, images"):
        build("bad_holdout", data, manual_dir=photos, holdout="pixels")
    two = tmp_path / "two"
    make_tree(two, {"arch": 2, "bridge": 2})
    with pytest.raises(InputError, match="--holdout classes needs at least 3 classes .*got 2"):
        build("two_classes", data, manual_dir=two)
    with pytest.raises(InputError, match=r"--eval_fraction 0.1 with --holdout images holds no "
                                         "image out"):
        build("none_held", data, manual_dir=two, eval_fraction=0.1, holdout="images")
    assert not [n for n in ("bad_fraction", "bad_holdout", "two_classes", "none_held")
                if (data / n).exists()]                       # nothing written


# -- 3. bad input: one error, naming the files -------------------------------------------------

def _missing(photos):
    rows = "".join(f"{c}/{i}.jpg,{c}\n" for c, n in SIZES.items() for i in range(n))
    (photos / "list.csv").write_text("path,label\n" + rows + "arch/gone.jpg,arch\n")
    return {"csv_path": photos / "list.csv"}


def _corrupt(photos):
    (photos / "bridge" / "bad.jpg").write_bytes(np.random.default_rng(7).bytes(600))
    whole = (photos / "castle" / "0.jpg").read_bytes()
    (photos / "castle" / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    return {}


def _duplicate(photos):
    shutil.copy(photos / "arch" / "1.jpg", photos / "dome" / "copy.jpg")
    return {}


def _small(photos):
    (photos / "lonely").mkdir()
    (photos / "lonely" / "only.jpg").write_bytes(jpeg(np.random.default_rng(99)))
    return {}


def _loose(photos):
    shutil.copy(photos / "arch" / "0.jpg", photos / "stray.jpg")
    return {}


@pytest.mark.parametrize("damage,texts", [
    (_missing, ["1 of 20 image file(s) cannot be used", "arch/gone.jpg: image file not found"]),
    (_corrupt, ["2 of 21 image file(s) cannot be used",
                "bridge/bad.jpg: cannot read the image: not an image file",
                "castle/cut.jpg: cannot read the image: the file is truncated"]),
    (_duplicate, ["1 group(s) of files with the same content: arch/1.jpg = dome/copy.jpg",
                  "keep one copy of each"]),
    (_small, ["1 class(es) with fewer than 2 images: lonely", "--skip_small_classes"]),
    (_loose, ["1 image(s) directly in the folder (stray.jpg)", "in a class subfolder"]),
], ids=["missing", "corrupt", "duplicate", "small", "loose"])
def test_bad_photos_are_one_error_naming_the_files(tmp_path, damage, texts):
    photos = tmp_path / "photos"
    make_tree(photos)
    source = damage(photos) or {"manual_dir": photos}
    with pytest.raises(InputError) as e:
        build("my_set", tmp_path / "tfds", **source)
    for t in texts:
        assert t in str(e.value), (t, str(e.value))
    assert not (tmp_path / "tfds" / "my_set").exists()       # checked before writing


def test_exif_rotated_phone_photos_are_read_upright(tmp_path):
    """Portrait phone photos (stored sideways, EXIF orientation 6 or 8) are accepted (before:
    "corrupt file") and the training records decode them upright, as a browser shows them."""
    import io

    from PIL import Image

    from scvnet_jax.images import decode_image
    photos = tmp_path / "photos"
    make_tree(photos)
    for name, orientation in (("arch/0.jpg", 6), ("tower/1.jpg", 8)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()     # stored 24 wide x 40 high, shown 40 wide x 24 high
        Image.fromarray(np.random.default_rng(orientation).integers(
            0, 256, (40, 24, 3), dtype=np.uint8)).save(buf, "JPEG", exif=exif)
        (photos / name).write_bytes(buf.getvalue())
    build("phone_set", tmp_path / "tfds", manual_dir=photos, eval_fraction=0.0)
    _, rows = records("phone_set", tmp_path / "tfds", "train")
    shapes = {image_id: decode_image(data, image_id).shape for _, image_id, data in rows}
    assert shapes["arch/0.jpg"] == shapes["tower/1.jpg"] == (24, 40, 3)


def test_skip_small_classes_drops_them_and_says_so(tmp_path):
    photos = tmp_path / "photos"
    make_tree(photos)
    _small(photos)
    meta = build("my_set", tmp_path / "tfds", manual_dir=photos, skip_small_classes=True)
    assert meta["notes"] == meta["skipped"] == ["left out 1 class(es) with 1 image: lonely"]
    assert sorted(meta["class_names"] + meta["eval_class_names"]) == sorted(SIZES)


@pytest.mark.parametrize("name,text", [
    ("My-Set", "--name 'My-Set': expected a snake_case name"),
    ("mnist", "--name 'mnist': a dataset of that name is already defined"),
    ("demo_landmarks", "--name 'demo_landmarks': a dataset of that name is already defined"),
])
def test_bad_names(tmp_path, name, text):
    photos = tmp_path / "photos"
    make_tree(photos, {"arch": 2, "bridge": 2, "castle": 2})
    with pytest.raises(InputError, match=text):
        build(name, tmp_path / "tfds", manual_dir=photos)
    assert not (tmp_path / "tfds").exists()


def test_rebuild_from_other_photos_is_refused_and_the_same_is_reused(tmp_path):
    photos = tmp_path / "photos"
    make_tree(photos)
    data = tmp_path / "tfds"
    first = build("my_set", data, manual_dir=photos)
    before = snapshot(data)
    again = build("my_set", data, manual_dir=photos)
    assert again["reused"] is True and again["fingerprint"] == first["fingerprint"]
    assert again["class_offsets"] == first["class_offsets"]
    assert snapshot(data) == before

    with pytest.raises(InputError, match=r"my_set/1.0.0: a set named 'my_set' is already "
                                         "built there from other photos or options"):
        build("my_set", data, manual_dir=photos, seed=1)      # other options
    (photos / "dome" / "0.jpg").write_bytes(jpeg(np.random.default_rng(123)))
    with pytest.raises(InputError, match="already built there from other photos"):
        build("my_set", data, manual_dir=photos)              # other photos
    assert snapshot(data) == before                           # untouched


def test_cli_builds_reuses_and_reports_one_error_line(tmp_path, capsys, one_error_line):
    photos = tmp_path / "photos"
    make_tree(photos)
    data = str(tmp_path / "tfds")
    args = ["folder", "--manual_dir", str(photos), "--name", "my_set", "--data_dir", data,
            "--workers", "2"]
    assert build_cli.main(args) == 0
    assert "my_set: built in" in capsys.readouterr().out
    assert build_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "my_set: already built, unchanged" in out and f"folder:{data}/my_set" in out

    (photos / "arch" / "0.jpg").write_bytes(b"not a jpeg")
    assert build_cli.main(args) == 2
    one_error_line(capsys.readouterr().err, "arch/0.jpg", "cannot read the image")

    other = tmp_path / "other"
    make_tree(other, seed=5)
    args[2] = str(other)
    assert build_cli.main(args) == 2
    one_error_line(capsys.readouterr().err, "a set named 'my_set' is already built")

    csv = tmp_path / "list.csv"
    csv.write_text("../photos/tower/gone.jpg,tower\n")
    assert build_cli.main(["folder", "--csv", str(csv), "--name", "csv_set",
                           "--data_dir", data]) == 2
    one_error_line(capsys.readouterr().err, "tower/gone.jpg: image file not found")
    assert not (tmp_path / "tfds" / "csv_set").exists()


# -- 4. the held-out split as a benchmark ------------------------------------------------------

def test_benchmark_of_held_out_classes(tmp_path):
    photos = tmp_path / "photos"
    sizes = {c: 4 for c in ("arch", "bridge", "castle", "dome", "tower")}
    labels = make_tree(photos, sizes)
    data, cache = tmp_path / "tfds", tmp_path / "cache"
    meta = build("my_set", data, manual_dir=photos, eval_fraction=0.4)
    ds = folder.open_benchmark(f"folder:{data}/my_set", cache)
    assert ds.protocol == "single" and ds.settings == ("all",)
    held = meta["eval_class_names"]
    assert len(held) == 2
    # Database = the held-out images, by class: 0-3 of held[0], 4-7 of held[1].
    assert ds.imlist == sorted(i for i in labels if labels[i] in held)
    assert [labels[i] for i in ds.imlist] == [held[0]] * 4 + [held[1]] * 4
    assert ds.qimlist == ds.imlist                            # every held-out image a query
    for q, g in enumerate(ds.gnd):
        same = [j for j, i in enumerate(ds.imlist) if labels[i] == labels[ds.imlist[q]]]
        assert g["easy"].tolist() == [j for j in same if j != q]
        assert g["junk"].tolist() == [q] and g["hard"].size == 0 and g["bbx"] is None
    for path, image_id in zip(ds.db_paths, ds.imlist):
        assert Path(path).read_bytes() == (photos / image_id).read_bytes()
    assert ds.query_paths == ds.db_paths
    assert "8 queries (held-out classes, 0.4 of the set, seed 0), 8 database images" \
        in ds.notes[0]

    perfect = np.array([[q] + g["easy"].tolist() + [j for j in range(8) if labels[
        ds.imlist[j]] != labels[ds.imlist[q]]] for q, g in enumerate(ds.gnd)]).T
    assert metrics.score("single", perfect, ds.gnd, (1,)) == ({"all": 1.0}, {"all": [1.0]})
    # The same ranking 0..7 for every query. A query of the first class (0-3) finds its 3
    # positives first once its own image (junk) is dropped: AP 1, P@1 1. A query of the
    # second class (4-7): after dropping itself its 3 positives are at 0-based positions
    # 4, 5, 6 of 7; trapezoidal AP = 1/3 * sum over j of (j/rank_j + (j+1)/(rank_j+1)) / 2
    #   = 1/6 * (0/4 + 1/5 + 1/5 + 2/6 + 2/6 + 3/7) = 1/6 * 157/105 = 157/630, P@1 0.
    # mAP = (4 * 1 + 4 * 157/630) / 8 = 787/1260; mP@1 = 0.5.
    same_order = np.tile(np.arange(8)[:, None], (1, 8))
    maps, mpk = metrics.score("single", same_order, ds.gnd, (1,))
    assert maps["all"] == pytest.approx(787 / 1260, abs=1e-12)
    assert mpk["all"] == [0.5]
    # results.json's per-class AP: the queries' classes, AP 1 and 157/630 per class
    from scvnet_jax.evaluation import report
    from scvnet_jax.evaluation.pipelines import PipelineResult

    assert ds.query_classes == [labels[i] for i in ds.qimlist]
    aps = metrics.score_queries("single", same_order, ds.gnd, (1,))[2]
    per = report.per_query_json(PipelineResult("p", "", {}, maps, mpk, {}, aps, ds.qimlist,
                                               ds.query_classes))
    assert per["per_class"][held[0]] == {"queries": 4, "AP": {"all": 1.0}}
    assert per["per_class"][held[1]]["AP"]["all"] == pytest.approx(157 / 630, abs=1e-12)
    # validation during training finds this held-out split by itself (eval.dataset "auto")
    from scvnet_jax.configs import demo
    from scvnet_jax.training import validation
    cfg = demo.set_fields(demo.get_config(), {"data.name": "my_set", "data.data_dir": str(data)})
    assert validation.resolve_dataset(cfg) == f"folder:{data / 'my_set'}"

    before = snapshot(ds.root)                                # a second call: the cache
    again = folder.open_benchmark(f"folder:{data}/my_set", cache)
    assert again.root == ds.root and again.imlist == ds.imlist and again.db_paths == ds.db_paths
    assert snapshot(ds.root) == before
    assert [p.name for p in (cache / "folder_sets").iterdir()] == [ds.root.name]


def test_benchmark_of_held_out_images_includes_the_training_images(tmp_path):
    photos = tmp_path / "photos"
    labels = make_tree(photos)
    data = tmp_path / "tfds"
    meta = build("my_set", data, manual_dir=photos, eval_fraction=0.4, holdout="images")
    ds = folder.open_benchmark(f"folder:{data}/my_set", tmp_path / "cache")
    _, held = records("my_set", data, "eval")
    _, train = records("my_set", data, "train")
    assert ds.imlist == [i for _, i, _ in held] + [i for _, i, _ in train]
    assert sorted(ds.imlist) == sorted(labels)                # the whole set
    assert ds.qimlist == [i for _, i, _ in held] and len(ds.qimlist) == len(held)
    n_train = meta["class_offsets"][-1]
    for q, g in enumerate(ds.gnd):
        c = labels[ds.imlist[q]]
        assert g["easy"].tolist() == [j for j, i in enumerate(ds.imlist)
                                      if labels[i] == c and j != q]
        assert any(j >= len(held) for j in g["easy"])         # training images are positives
        assert g["junk"].tolist() == [q]
    assert len(ds.db_paths) == len(held) + n_train
    for path, image_id in zip(ds.db_paths, ds.imlist):
        assert Path(path).read_bytes() == (photos / image_id).read_bytes()
    assert "(the training images included)" in ds.notes[0]


def test_benchmark_writes_only_under_its_cache_folder(tmp_path):
    """A CSV may name files by absolute path or climb out of its folder (../): the
    benchmark's copies still land under the cache folder, and the photos are not touched."""
    photos = tmp_path / "photos"
    labels = make_tree(photos)
    (tmp_path / "lists").mkdir()
    rows = [f"{photos / i if labels[i] in ('arch', 'castle') else '../photos/' + i},{labels[i]}"
            for i in labels]
    (tmp_path / "lists" / "list.csv").write_text("\n".join(rows) + "\n")
    originals = snapshot(photos)
    data = tmp_path / "tfds"
    build("my_set", data, csv_path=tmp_path / "lists" / "list.csv", eval_fraction=0.6,
          holdout="images")
    ds = folder.open_benchmark(f"folder:{data}/my_set", tmp_path / "cache")
    assert sorted(ds.imlist) == sorted(r.split(",")[0] for r in rows)
    for path, image_id in zip(ds.db_paths, ds.imlist):
        p = Path(path).resolve()
        assert p.is_relative_to(ds.root.resolve()), (image_id, path)
        assert p.read_bytes() == (photos / image_id.split("photos/")[-1]).read_bytes()
    assert snapshot(photos) == originals
    assert sorted(p.name for p in (tmp_path / "cache" / "folder_sets").iterdir()) == [
        ds.root.name]


# -- a data_dir that is a file; what the scan leaves out -----------------------------------

@pytest.mark.parametrize("where", ["data_dir", "data_dir/name", "under_a_file"])
def test_data_dir_that_is_a_file_is_one_error_line_and_writes_nothing(tmp_path, capsys,
                                                                      one_error_line, where):
    photos = tmp_path / "photos"
    make_tree(photos)
    data = tmp_path / "tfds"
    if where == "data_dir":
        data.write_text("")
        target, text = data, f"--data_dir {data}: is a file"
    elif where == "data_dir/name":
        data.mkdir()
        (data / "my_set").write_text("")
        target, text = data, f"{data / 'my_set'} is a file"
    else:
        data.write_text("")
        target, text = data / "sub", f"{data} is a file"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert build_cli.main(["folder", "--manual_dir", str(photos), "--name", "my_set",
                           "--data_dir", str(target), "--workers", "2"]) == 2
    one_error_line(capsys.readouterr().err, text)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_empty_class_folder_and_dangling_link_are_reported(tmp_path, capsys):
    photos = tmp_path / "photos"
    make_tree(photos)
    (photos / "empty").mkdir()
    (photos / "empty" / "notes.txt").write_text("no images here")
    (photos / "arch" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (photos / "lost").symlink_to(tmp_path / "no_folder")
    assert build_cli.main(["folder", "--manual_dir", str(photos), "--name", "my_set",
                           "--data_dir", str(tmp_path / "tfds"), "--workers", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(f"class folder {photos / 'empty'}: no image files" in ln for ln in out), out
    for link in (photos / "arch" / "gone.jpg", photos / "lost"):
        assert any(f"left out {link}: a symbolic link to nothing" in ln for ln in out), out
    meta = folder.prepared_metadata("my_set", tmp_path / "tfds")
    assert len(meta["skipped"]) == 3 and "empty" not in meta["class_names"] + meta[
        "eval_class_names"]


def test_eval_on_a_folder_set_notes_blind_protocol_and_clipped_icfrr(tmp_path, capsys,
                                                                    tiny_model_dir):
    """eval.py --protocol official on a folder set (no revisitop labels) says the CVNet
    rerank runs blind, and ICFRR's default KG 256 / KQ 250 on a 5-image database says they
    are clipped: a printed note each, and in results.json."""
    import json

    from scvnet_jax import eval as ev

    photos = tmp_path / "photos"
    make_tree(photos)
    build("my_set", tmp_path / "tfds", manual_dir=photos)
    out = tmp_path / "res" / "results.json"
    assert ev.main(["--dataset", f"folder:{tmp_path / 'tfds' / 'my_set'}",
                    "--weights", str(tiny_model_dir), "--protocol", "official",
                    "--topk", "2", "--pipelines", "cvnet_global,cvnet_rerank,icfrr",
                    "--cache_dir", str(tmp_path / "cache"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    blind = ("note: cvnet_rerank: protocol official needs revisitop's Easy/Hard/junk labels, "
             "which folder:my_set has not; it runs blind")
    clip = "note: icfrr: KG=256, KQ=250 clipped to the database size (5 images): KG=5, KQ=5"
    for note in (blind, clip):
        assert sum(ln.startswith(note) for ln in printed) == 1, printed
    res = json.loads(out.read_text())
    assert res["cvnet_rerank"]["protocol"] == "blind"
    assert any(n.startswith(blind[len("note: "):]) for n in res["cvnet_rerank"]["notes"])
    assert clip[len("note: "):] in res["icfrr"]["notes"]
    assert not any("clipped" in n or "blind" in n for n in res["cvnet_global"].get("notes", []))


def _printed_next_commands(tmp_path, capsys, monkeypatch):
    """Builds a set from tmp_path (relative paths, as a user types them) -> the printed
    (train, evaluate) commands, split into words."""
    import shlex

    make_tree(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    assert build_cli.main(["folder", "--manual_dir", "photos", "--name", "my_set",
                           "--data_dir", "tfds", "--workers", "2"]) == 0
    printed = {ln.split(":", 1)[0].strip(): shlex.split(ln.split(":", 1)[1])
               for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")}
    train, evaluate = printed["train"], printed["evaluate"]
    assert train[:3] == ["python", "-m", "scvnet_jax.train"], train
    assert evaluate[:3] == ["python", "-m", "scvnet_jax.eval"], evaluate
    return train, evaluate


def test_the_printed_next_commands_parse_and_chain(tmp_path, capsys, monkeypatch):
    """The printed commands' flags and configs are accepted (up to where the work would
    start), and the evaluate command reads the model the train command writes."""
    from scvnet_jax import eval as ev
    from scvnet_jax import train as tr
    from scvnet_jax import training

    train, evaluate = _printed_next_commands(tmp_path, capsys, monkeypatch)
    seen = {}
    monkeypatch.setattr(training, "train", lambda cfg, workdir, **kw: seen.update(
        cfg=cfg, workdir=workdir) or 0)
    monkeypatch.setattr(ev, "run", lambda cfg, **kw: seen.update(eval=cfg) or 0)
    assert tr.main(train[3:]) == 0, capsys.readouterr().err
    assert seen["cfg"].data.name == "my_set" and seen["cfg"].data.data_dir == "tfds"
    assert ev.main(evaluate[3:]) == 0, capsys.readouterr().err
    assert seen["eval"].weights == f"{seen['workdir']}/model"
    assert seen["eval"].dataset == "folder:tfds/my_set"


@pytest.mark.slow   # a train command (total_steps 0) and an evaluation of an R50: ~100 s
def test_the_printed_next_commands_run_as_printed(tmp_path, capsys, monkeypatch, run_module):
    """After `data.build folder`, the "train:" and "evaluate:" lines run as printed, from
    the same folder: the train command (with total_steps 0: it exports its initialisation)
    writes the model the evaluate command reads."""
    from scvnet_jax import eval as ev

    train, evaluate = _printed_next_commands(tmp_path, capsys, monkeypatch)
    r = run_module("train", *train[3:], "--config.total_steps=0", "--noprogress",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert ev.main([*evaluate[3:], "--pipelines", "cvnet_global",
                    "--cache_dir", str(tmp_path / "cache")]) == 0
    assert (tmp_path / "results" / "my_set" / "results.json").is_file()
