"""An index folder (`scvnet-search convert`: shards, IVF-PQ lists on disk): query, serve
and duplicates give the answers of the index file it came from; bad input is one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax.app import server
from scvnet_jax.app.cli import main
from scvnet_jax.engine import ondisk


@pytest.fixture(scope="module")
def folder(searcher, tmp_path_factory):
    out = tmp_path_factory.mktemp("folder") / "photos.folder"
    assert main(["convert", str(Path(searcher.index.root) / "photos.index"), str(out),
                 "--shard_rows", "4"]) == 0
    return out


def test_convert_says_what_it_wrote(searcher, tmp_path, capsys):
    out = tmp_path / "f"
    assert main(["convert", str(Path(searcher.index.root) / "photos.index"), str(out),
                 "--shard_rows", "6"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out}: 15 x 256 float16 in 3 shards, ")
    assert ("; search faiss ivfpq-disk, recall@10 1.000 against exact search on a sample "
            "(pca 0, nlist 1, m 32, nbits 3, nprobe 1)") in line
    index = sj.search.Index.load(out)
    assert isinstance(index.descriptors, ondisk.Rows) and len(index) == 15
    assert list(index.paths) == searcher.index.paths
    assert list(index.digests) == searcher.index.digests
    np.testing.assert_array_equal(np.asarray(index.descriptors), searcher.index.descriptors)
    assert (index.model, index.weights, index.max_side, index.family) == (
        searcher.index.model, searcher.index.weights, searcher.index.max_side,
        searcher.index.family)
    with pytest.raises(sj.ScvnetError, match="is not saved again as one file"):
        index.save(tmp_path / "whole.index")
    moved = sj.search.Index.load(out, root="/elsewhere").rerooted("/again")
    assert moved.paths[0] == "/again/" + Path(index.paths[0]).name


def test_rest_answers_equal_the_index_file(searcher, folder):
    from fastapi.testclient import TestClient
    on_disk = server.Searcher(sj.search.Index.load(folder), searcher.model)
    a, b = TestClient(server.create_app(searcher)), TestClient(server.create_app(on_disk))
    health = b.get("/api/health").json()
    assert health["images"] == 15 and health["backend"] == "faiss ivfpq-disk"
    assert health["version"] == a.get("/api/health").json()["version"]
    for params in ({"id": 2, "k": 5}, {"id": 9, "k": 15}, {"id": 4, "k": 4,
                                                           "rerank": "superglobal"}):
        want, got = (c.post("/api/search", params=params).json() for c in (a, b))
        assert [(h["id"], h["path"]) for h in got["hits"]] == [
            (h["id"], h["path"]) for h in want["hits"]]
        np.testing.assert_allclose([h["score"] for h in got["hits"]],
                                   [h["score"] for h in want["hits"]], atol=1e-6)
    assert b.get("/api/image/3").content == a.get("/api/image/3").content
    dup = {"threshold": 0.9, "k": 5}
    assert (b.get("/api/duplicates", params=dup).json()["groups"] ==
            a.get("/api/duplicates", params=dup).json()["groups"])


def test_query_json_equals_the_index_file(searcher, folder, capsys):
    query = searcher.index.paths[11]
    runs = []
    for index in (Path(searcher.index.root) / "photos.index", folder):
        assert main(["query", "--index", str(index), query, "-k", "6", "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    want, got = runs
    assert [h["path"] for h in got["hits"]] == [h["path"] for h in want["hits"]]
    np.testing.assert_allclose([h["score"] for h in got["hits"]],
                               [h["score"] for h in want["hits"]], atol=1e-6)


def test_bad_input_is_one_line(searcher, folder, tmp_path, capsys):
    src = str(Path(searcher.index.root) / "photos.index")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for argv, message in (
            (["convert", src, str(mine)], f"{mine}: exists and is not an index folder"),
            (["convert", src, str(tmp_path / "o"), "--m", "5"],
             "m 5: must divide the dimension it splits (256)"),
            (["convert", src, str(tmp_path / "o"), "--pca", "300"],
             "pca 300: at most the descriptors' dimension 256"),
            (["convert", str(folder), str(tmp_path / "o")], "is already an index folder"),
            (["convert", src, str(tmp_path / "mine" / "notes.txt" / "o")],
             "cannot write the index folder there"),
            (["serve", "--index", str(folder), "--watch"],
             "is an index folder, which is not updated in place")):
        assert _exit_code(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert (mine / "notes.txt").read_text() == "keep me" and not (tmp_path / "o").exists()
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    shard = damaged / "descriptors" / "shard-00001.npy"
    with open(shard, "r+b") as f:
        f.truncate(200)
    assert _exit_code(["query", "--index", str(damaged), searcher.index.paths[0]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"error: {shard}: damaged descriptor shard" in err


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:         # argparse's refusals
        return e.code
