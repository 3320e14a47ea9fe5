"""GLDv2 retrieval benchmark: validating a fake manual download, loading it, scoring it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scvnet_jax import metrics
from scvnet_jax.data import gldv2_retrieval as g2
from scvnet_jax.data.builders import gldv2_image_path
from scvnet_jax.errors import InputError

# index.csv order (not sorted): database indices 0..5
INDEX = ["e1a0000000000005", "0b10000000000001", "9c20000000000002", "3d30000000000003",
         "7e40000000000004", "a050000000000000"]
TEST = ["10c0000000000000", "21d0000000000001", "32e0000000000002", "43f0000000000003",
        "5400000000000004"]
# Solution order differs from test.csv; images by database index.
SOLUTION = [(TEST[3], [2, 4, 5], "Private"),
            (TEST[0], [1, 3], "Public"),
            (TEST[2], None, "Ignored"),     # "None" and no image file: not checked
            (TEST[1], [0], "Private"),
            (TEST[4], [], "Ignored")]


def jpeg(seed: int, shape=(12, 16)) -> bytes:
    import cv2
    img = np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def fake_manual(root: Path, shape=(12, 16)) -> Path:
    """A GLDv2 manual folder: the three CSVs and index/ and test/ image trees."""
    root.mkdir(parents=True)
    (root / "index.csv").write_text("id\n" + "\n".join(INDEX) + "\n")
    (root / "test.csv").write_text("id\n" + "\n".join(TEST) + "\n")
    rows = [f"{t},{'None' if ims is None else ' '.join(INDEX[i] for i in ims)},{u}"
            for t, ims, u in SOLUTION]
    (root / "retrieval_solution_v2.1.csv").write_text("id,images,Usage\n" + "\n".join(rows)
                                                     + "\n")
    for sub, ids in (("index", INDEX), ("test", [t for t in TEST if t != TEST[2]])):
        for n, i in enumerate(ids):
            p = gldv2_image_path(root / sub, i)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(jpeg(n, shape))
    return root


def test_prepare_load_and_score(tmp_path):
    manual = fake_manual(tmp_path / "manual")
    path = g2.prepare(manual, tmp_path / "data")
    assert path == tmp_path / "data" / "gldv2_retrieval" / "gnd_gldv2_retrieval.json"
    obj = json.loads(path.read_text())
    assert obj["format"] == "scvnet_jax.gldv2_retrieval/1" and obj["ignored"] == 2
    assert obj["image_root"] == str(manual.resolve())

    ds = g2.load(tmp_path / "data")
    assert ds.name == "gldv2_retrieval" and ds.protocol == "gldv2"
    assert ds.settings == ("public", "private")
    assert ds.imlist == INDEX and ds.qimlist == [TEST[3], TEST[0], TEST[1]]
    assert [g["usage"] for g in ds.gnd] == ["private", "public", "private"]
    assert [[ds.imlist[i] for i in g["easy"]] for g in ds.gnd] == [
        [INDEX[2], INDEX[4], INDEX[5]], [INDEX[1], INDEX[3]], [INDEX[0]]]
    for g in ds.gnd:
        assert g["easy"].dtype == np.int64 and g["hard"].size == g["junk"].size == 0
        assert g["bbx"] is None
    assert ds.notes == ("GLDv2 retrieval: mAP@100 over the 3 test images with ground truth "
                        "(1 Public, 2 Private); 2 Ignored test images are not queries",)
    db, qs = ds.db_images(), ds.query_images()
    assert all(Path(r.path).is_file() for r in db + qs)
    assert Path(db[3].path) == manual.resolve() / "index/3/d/3" / f"{INDEX[3]}.jpg"
    # The same layout as the GLDv2-clean builder's (image_paths formats strings for speed).
    assert ds.db_paths == [str(gldv2_image_path(manual.resolve() / "index", i)) for i in INDEX]
    assert ds.query_paths == [str(gldv2_image_path(manual.resolve() / "test", i))
                              for i in ds.qimlist]
    assert Path(qs[1].path).name == f"{TEST[0]}.jpg" and qs[1].bbx is None

    ranks = np.array([[2, 4, 5, 0, 1, 3],     # TEST[3] private, gt {2, 4, 5}
                      [3, 0, 2, 1, 4, 5],     # TEST[0] public,  gt {1, 3}
                      [5, 0, 1, 2, 3, 4]]).T  # TEST[1] private, gt {0}
    maps, mpk = metrics.score("gldv2", ranks, ds.gnd, ks=(1, 5))
    # TEST[3]: hits at 1, 2, 3 -> AP 1.  TEST[0]: hits at 1, 4 -> (1/1 + 2/4) / 2 = 3/4.
    # TEST[1]: hit at 2 -> 1/2.  Public 3/4; private (1 + 1/2) / 2 = 3/4.
    assert maps == pytest.approx({"public": 0.75, "private": 0.75})
    # P@1: public 1; private (1 + 0) / 2.  P@5: public 2/5; private (3/5 + 1/5) / 2 = 2/5.
    assert mpk == {"public": pytest.approx([1.0, 0.4]), "private": pytest.approx([0.5, 0.4])}


def _edit(name, old, new):
    def f(root):
        p = root / name
        text = p.read_text()
        assert old in text
        p.write_text(text.replace(old, new, 1))
    return f


def _remove(name):
    return lambda root: (root / name).unlink()


def _remove_image(sub, image_id):
    return lambda root: gldv2_image_path(root / sub, image_id).unlink()


SOL = "retrieval_solution_v2.1.csv"
BAD = {
    "missing csv": (_remove("test.csv"), r"missing test.csv; expected GLDv2's index.csv"),
    "index header": (_edit("index.csv", "id\n", "image_id\n"),
                     r"index.csv: columns \['image_id'\], expected exactly \['id'\]"),
    "solution header": (_edit(SOL, "id,images,Usage", "id,images"),
                        r"retrieval_solution_v2.1.csv: columns \['id', 'images'\], expected "
                        r"exactly \['id', 'images', 'Usage'\]"),
    "usage": (_edit(SOL, ",Public", ",Secret"),
              r"retrieval_solution_v2.1.csv:3: Usage 'Secret', expected one of \['Public', "
              r"'Private', 'Ignored'\]"),
    "query not in test.csv": (_edit("test.csv", TEST[1], "ffff000000000000"),
                              rf"retrieval_solution_v2.1.csv:5: test id '{TEST[1]}' is not "
                              r"in test.csv"),
    "image not in index.csv": (_edit(SOL, INDEX[3], "abcdef0000000000"),
                               rf"retrieval_solution_v2.1.csv:3: index image id\(s\) of test "
                               rf"image '{TEST[0]}' not in index.csv: abcdef0000000000"),
    "duplicate index id": (_edit("index.csv", INDEX[4], INDEX[1]),
                           rf"index.csv:6: id '{INDEX[1]}' appears twice \(first on line 3\)"),
    "duplicate query": (_edit(SOL, f"{TEST[1]},", f"{TEST[3]},"),
                        rf"retrieval_solution_v2.1.csv:5: test id '{TEST[3]}' appears twice"),
    "no images": (_edit(SOL, f"{INDEX[1]} {INDEX[3]},Public", ",Public"),
                  rf"retrieval_solution_v2.1.csv:3: Public test image '{TEST[0]}' has no "
                  r"images"),
    "missing index image": (_remove_image("index", INDEX[2]),
                            rf"1 of the 6 index \(index.csv\) image file\(s\) are missing "
                            rf"under \S+/index: \S+/9/c/2/{INDEX[2]}.jpg"),
    "missing query image": (_remove_image("test", TEST[1]),
                            r"1 of the 3 scored test \(retrieval_solution_v2.1.csv\) image "
                            rf"file\(s\) are missing under \S+/test: \S+/{TEST[1]}.jpg"),
    "no scored queries": (lambda root: (root / SOL).write_text(
                              f"id,images,Usage\n{TEST[2]},None,Ignored\n"),
                          r"retrieval_solution_v2.1.csv: no Public or Private rows "
                          r"\(1 Ignored\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_prepare_rejects_bad_download(tmp_path, case):
    mutate, match = BAD[case]
    manual = fake_manual(tmp_path / "manual")
    mutate(manual)
    with pytest.raises(InputError, match=match):
        g2.prepare(manual, tmp_path / "data")
    assert not (tmp_path / "data" / "gldv2_retrieval").exists()


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="python -m scvnet_jax.data.build gldv2_retrieval"):
        g2.load(tmp_path / "none")
    path = g2.prepare(fake_manual(tmp_path / "manual"), tmp_path / "data")
    good = json.loads(path.read_text())
    cases = [("{not json", "not a readable JSON"),
             (json.dumps({**good, "format": "other/2"}), r"'format' is 'other/2', expected"),
             (json.dumps({k: v for k, v in good.items() if k != "qimlist"}),
              r"missing key\(s\) qimlist"),
             (json.dumps({**good, "gnd": [{**good["gnd"][0], "ok": [99]}] + good["gnd"][1:]}),
              r"'gnd'\[0\] .*'ok' must be a non-empty list of database indices in \[0, 6\)")]
    for text, match in cases:
        path.write_text(text)
        with pytest.raises(InputError, match=match) as e:
            g2.load(tmp_path / "data")
        assert "gnd_gldv2_retrieval.json" in str(e.value)


def test_eval_py_runs_the_benchmark(tmp_path, capsys, eval_main, monkeypatch):
    """build CLI + eval.py --dataset gldv2_retrieval with the demo model: rows public and
    private, metric mAP@100, the mAPs metrics.score gives on the ranks eval.py wrote, which
    are each query's top rows only (100; 4 here, of the 6 index images)."""
    import scvnet_jax as sj
    from scvnet_jax.data import build
    from scvnet_jax.evaluation import pipelines

    monkeypatch.setitem(pipelines.KEEP_ROWS, "gldv2", 4)

    manual = fake_manual(tmp_path / "manual", shape=(64, 80))
    assert build.main(["gldv2_retrieval", "--manual_dir", str(manual), "--data_dir",
                       str(tmp_path / "data")]) == 0
    assert "3 queries, 6 index images" in capsys.readouterr().out
    out = tmp_path / "res.json"
    assert eval_main("--dataset", "gldv2_retrieval", "--data_dir", tmp_path / "data",
                     "--weights", sj.demo_model_path(), "--pipelines", "superglobal_global",
                     "--cache_dir", "", "--output", out) == 0
    text = capsys.readouterr().out
    assert "mAP@100" in text and "public " in text and "private " in text
    res = json.loads(out.read_text())["superglobal_global"]
    assert set(res["mAP"]) == {"public", "private"} and res["metric"] == "mAP@100"
    ranks = np.load(tmp_path / "res_ranks.npz")["superglobal_global"]
    assert ranks.shape == (4, 3)
    maps, _ = metrics.score("gldv2", ranks, g2.load(tmp_path / "data").gnd, (1, 5, 10))
    assert res["mAP"] == maps
