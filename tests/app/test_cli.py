"""scvnet-search index / query: the commands' output, JSON equal to sj.search, refusals as
one error line, and an index killed mid-way that resumes."""
from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax.app.cli import main


@pytest.fixture(scope="module")
def photos(tmp_path_factory, demo_benchmark):
    """12 demo-benchmark photos of three subjects, in two sub-folders."""
    jpg = demo_benchmark / "demo" / "jpg"
    out = tmp_path_factory.mktemp("photos")
    for subject in ("astronaut", "coins", "rocket"):
        for i, p in enumerate(sorted(jpg.glob(f"{subject}_*"))[:4]):
            (out / ("x" if i % 2 else "y")).mkdir(exist_ok=True)
            shutil.copy(p, out / ("x" if i % 2 else "y") / p.name)
    return out


def test_index_then_query(photos, tmp_path, capsys):
    index = tmp_path / "my.index"
    assert main(["index", str(photos), "--index", str(index)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"indexed {photos.resolve()}: 12 images (0 reused, 12 "
                             "extracted, 0 removed, 0 skipped) in ")
    assert out[1].startswith(f"wrote {index}: 12 x 256 float16 (cvnet), ")
    assert out[1].endswith(" MB; search exact")
    assert main(["index", str(photos), "--index", str(index)]) == 0
    assert "12 images (12 reused, 0 extracted, 0 removed, 0 skipped)" in capsys.readouterr().out

    query = sorted(photos.rglob("coins_*"))[0]
    assert main(["query", "--index", str(index), str(query), "-k", "4"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"{query}  (rerank none; 12 images; search exact)"
    assert table[1].split() == ["rank", "score", "path"]
    assert table[2].split()[0] == "1" and table[2].split()[2] == str(query.resolve())
    assert len(table) == 2 + 4 + 1 and table[-1].startswith("1 query in ")

    model = sj.load(sj.demo_model_path())
    loaded = sj.search.Index.load(index)
    for rerank in ("none", "superglobal", "alpha_qe"):
        assert main(["query", "--index", str(index), str(query), "-k", "5", "--rerank",
                     rerank, "--json", "--option" if rerank == "alpha_qe" else "-k",
                     "k=2" if rerank == "alpha_qe" else "5"]) == 0
        got = json.loads(capsys.readouterr().out)
        want = loaded.search(model, str(query), k=5, rerank=None if rerank == "none"
                             else rerank, options={"k": 2} if rerank == "alpha_qe" else None)
        assert got["query"] == str(query.resolve()) and got["rerank"] == rerank
        assert [h["path"] for h in got["hits"]] == [h.path for h in want[0]]
        np.testing.assert_allclose([h["score"] for h in got["hits"]],
                                   [h.score for h in want[0]], atol=1e-6)


def test_query_regions_and_box(photos, tmp_path, capsys):
    """--regions N: the regions searched are printed and the hits are search_regions';
    --box: the crop's hits."""
    index = tmp_path / "my.index"
    assert main(["index", str(photos), "--index", str(index)]) == 0
    query = sorted(photos.rglob("rocket_*"))[0]
    assert main(["query", "--index", str(index), str(query), "--regions", "2", "-k", "4",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    model = sj.load(sj.demo_model_path())
    loaded = sj.search.Index.load(index)
    hits, found = loaded.search_regions(model, str(query), k=4, regions=2)
    assert got["regions"] == [list(r) for r in found] and len(found) >= 1
    assert [h["path"] for h in got["hits"]] == [h.path for h in hits]
    x1, y1, x2, y2 = found[0]
    assert main(["query", "--index", str(index), str(query), "--box", f"{x1},{y1},{x2},{y2}",
                 "-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].endswith(f"; box {x1},{y1},{x2},{y2}; search exact)")
    want = loaded.search(model, str(query), k=3, boxes=[found[0]])[0]
    assert [ln.split()[2] for ln in table[2:5]] == [h.path for h in want]


def test_faiss_and_qdrant_backends_from_the_command_line(photos, tmp_path, capsys):
    """index --backend faiss reports its recall; query --backend qdrant (local mode) and
    the faiss index give the exact search's hits (flat faiss is exact)."""
    index = tmp_path / "f.index"
    assert main(["index", str(photos), "--index", str(index), "--backend", "faiss",
                 "--faiss_kind", "flat"]) == 0
    out = capsys.readouterr().out
    assert "; search faiss flat, recall@10 1.000 against exact search on a sample" in out
    query = str(sorted(photos.rglob("coins_*"))[1])
    hits = {}
    for backend in ("index", "exact", "qdrant"):
        assert main(["query", "--index", str(index), query, "-k", "5", "--json",
                     "--backend", backend]) == 0
        hits[backend] = [h["path"] for h in json.loads(capsys.readouterr().out)["hits"]]
    assert hits["index"] == hits["exact"] == hits["qdrant"]


@pytest.mark.parametrize("args, message", [
    (["query", "--index", "{index}", "{query}", "-k", "0"], "argument -k: expected an "
     "integer >= 1, got 0"),
    (["query", "--index", "{index}", "{query}", "--rerank", "magic"], "--rerank magic: "
     "expected none or one of superglobal, cvnet"),
    (["query", "--index", "{index}", "{query}", "--rerank", "alpha_qe", "--option", "K=3"],
     "reranker alpha_qe: unknown option 'K'"),
    (["query", "--index", "{index}", "{query}", "--option", "k=3"], "--option k=3: options "
     "belong to a reranker: give --rerank NAME too"),
    (["query", "--index", "{index}", "missing.jpg"], "missing.jpg: query image not found"),
    (["query", "--index", "{tmp}/none.index", "{query}"], "none.index: no such index "
     "file"),
    (["query", "--index", "{index}", "{query}", "--weights", "{tiny}"], "gives other "
     "descriptors than the model"),
    (["index", "{tmp}/nothing", "--index", "{index}"], "nothing: not a folder"),
    (["index", "{photos}", "--index", "{tmp}"], "is a folder; the index is a file"),
    (["index", "{photos}", "--index", "{index}", "--weights", "{tiny}"], "built with "
     "another model"),
    (["index", "{photos}", "--index", "{index}", "--weights", "nope.pyth"], "--weights "
     "nope.pyth: no such file"),
    (["index", "{photos}", "--index", "{index}", "--family", "resnet"], "argument --family: "
     "invalid choice"),
    (["query", "--index", "{index}", "{query}", "--box", "5,5,1,1"], "argument --box: box "
     "must be x1,y1,x2,y2 with 0 <= x1 < x2"),
    (["query", "--index", "{index}", "{query}", "--regions", "-1"], "argument --regions: "
     "expected an integer >= 0"),
])
def test_refusals_are_one_error_line(args, message, photos, tmp_path, tiny_model_dir,
                                     capsys):
    index = tmp_path / "my.index"
    assert main(["index", str(photos), "--index", str(index)]) == 0
    capsys.readouterr()
    query = sorted(photos.rglob("*.jpg"))[0]
    args = [a.format(index=index, query=query, tmp=tmp_path, tiny=tiny_model_dir,
                     photos=photos) for a in args]
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    assert message in err, err


def test_the_working_size_is_recorded_in_the_index_and_used(photos, tmp_path, capsys,
                                                            one_error_line):
    """index --max_side records it; a rerun and a query without the flag use the index's
    (a query of an index at full size: 1024); another working size needs --rebuild."""
    from scvnet_jax import images

    index = tmp_path / "small.index"
    query = sorted(photos.rglob("coins_*"))[0]
    try:
        assert main(["index", str(photos), "--index", str(index), "--max_side", "100"]) == 0
        assert sj.search.Index.load(index).max_side == 100
        images.set_max_side(images.DEFAULT_MAX_SIDE)
        assert main(["index", str(photos), "--index", str(index)]) == 0
        assert "12 images (12 reused, 0 extracted" in capsys.readouterr().out
        images.set_max_side(images.DEFAULT_MAX_SIDE)
        assert main(["query", "--index", str(index), str(query), "-k", "1", "--json"]) == 0
        assert images.max_side() == 100
        (hit,) = json.loads(capsys.readouterr().out)["hits"]
        assert hit["path"] == str(query.resolve()) and hit["score"] > 0.999
        assert main(["index", str(photos), "--index", str(index), "--max_side", "0"]) == 2
        one_error_line(capsys.readouterr().err, "small.index: built with another model, "
                       "descriptor family, dtype or working size", "max_side 100", "--rebuild")
        # an index at full size (as every one from before): its queries are read at 1024
        assert main(["index", str(photos), "--index", str(index), "--max_side", "0",
                     "--rebuild"]) == 0
        images.set_max_side(images.DEFAULT_MAX_SIDE)
        assert main(["query", "--index", str(index), str(query), "-k", "1"]) == 0
        assert sj.search.Index.load(index).max_side == 0 and images.max_side() == 1024
    finally:
        images.set_max_side(images.DEFAULT_MAX_SIDE)


def test_help(capsys):
    for argv in (["--help"], ["index", "--help"], ["query", "--help"], ["serve", "--help"],
                 ["duplicates", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "scvnet-search index PHOTOS/" in out and "--rebuild" in out and "--json" in out
    assert "--max_upload_mb" in out and "127.0.0.1" in out
    assert "--token" in out and "SCVNET_SEARCH_TOKEN" in out and "--threshold T" in out


def test_index_help_names_the_distributed_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["index", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--distributed", "--coordinator_address", "--num_processes", "--process_id"):
        assert flag in out, flag
    with pytest.raises(SystemExit) as e:
        main(["index", "photos", "--index", "i.index", "--num_processes", "0"])
    assert e.value.code == 2
    assert "argument --num_processes: expected an integer >= 1" in capsys.readouterr().err


def test_coordinator_flags_need_distributed(tmp_path, capsys, one_error_line):
    """A run meant for several processes does not go on as one: one error line, nothing
    written."""
    (tmp_path / "photos").mkdir()
    assert main(["index", str(tmp_path / "photos"), "--index", str(tmp_path / "i.index"),
                 "--coordinator_address", "localhost:1234"]) == 2
    one_error_line(capsys.readouterr().err,
                   "--coordinator_address: only with --distributed (add it, or drop it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
def test_index_killed_midway_resumes(tmp_path, demo_benchmark, tiny_model_dir, run_module):
    """SIGKILL once two chunks are saved: the same command again extracts only the rest
    and writes the index an uninterrupted run writes."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((demo_benchmark / "demo" / "jpg").glob("*.jpg"))[:24]:
        shutil.copy(p, photos / p.name)
    index = tmp_path / "i.index"
    args = ["index", photos, "--index", index, "--weights", tiny_model_dir, "--chunk_size",
            4, "--batch_size", 4]
    proc = run_module("app", *args, wait=False)
    parts = tmp_path / "i.index.parts"
    deadline = time.time() + 600
    while time.time() < deadline and len(list(parts.glob("chunk_*.npz"))) < 2:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not index.exists()
    done = len(list(parts.glob("chunk_*.npz"))) * 4
    assert 8 <= done < 24, "the kill did not land mid-way"
    again = run_module("app", *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"({done} reused, {24 - done} extracted, 0 removed, 0 skipped)" in again.stdout
    ref = tmp_path / "ref.index"
    assert main(["index", str(photos), "--index", str(ref), "--weights",
                 str(tiny_model_dir)]) == 0
    a, b = sj.search.Index.load(index), sj.search.Index.load(ref)
    assert a.paths == b.paths and a.digests == b.digests and not parts.exists()
    np.testing.assert_array_equal(a.descriptors, b.descriptors)


@pytest.mark.parametrize("args, message", [
    (["query", "--index", "none.index", "q.jpg", "--rerank", "superglobal", "--option",
      "M=abc"], "reranker superglobal: option M = 'abc', expected an integer >= 1"),
    (["query", "--index", "none.index", "q.jpg", "--box", "-5,0,10,10"], "argument --box: "
     "box must be x1,y1,x2,y2 with 0 <= x1 < x2 and 0 <= y1 < y2 (pixels), got '-5,0,10,10'"),
    (["serve", "--index", "none.index", "--port", "80000"], "argument --port: expected a "
     "port in 1..65535, got '80000'"),
    (["serve", "--index", "none.index", "--port", "0"], "expected a port in 1..65535"),
    (["serve", "--index", "none.index", "--host", "0.0.0.0", "--port", "8000"],
     "--host 0.0.0.0 can be reached from other machines: give a token "
     "(SCVNET_SEARCH_TOKEN=SECRET in the environment, or --token), which every request must "
     "then carry"),
    (["serve", "--index", "none.index", "--host", "::", "--port", "8000"],
     "--host :: can be reached from other machines"),
    (["serve", "--index", "none.index", "--token", " ", "--port", "8000"],
     "--token is empty: expected a secret"),
    (["duplicates", "--index", "none.index", "--threshold", "1.5"],
     "argument --threshold: expected a cosine similarity in [-1, 1], got '1.5'"),
    (["duplicates", "--index", "none.index", "--threshold", "x"],
     "argument --threshold: expected a cosine similarity in [-1, 1], got 'x'"),
    (["duplicates", "--index", "none.index", "--threshold", "0.9"],
     "none.index: no such index file"),
])
def test_bad_values_are_one_error_before_the_model(args, message, capsys, one_error_line,
                                                   monkeypatch):
    """Each refused with one error line, exit 2, before any model or index is read (the
    index named does not exist)."""
    monkeypatch.setattr("scvnet_jax.app.cli._load", lambda w: pytest.fail("model loaded"))
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    one_error_line(capsys.readouterr().err, message)


def test_loopback_hosts():
    from scvnet_jax.app.cli import is_loopback
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.0.2.7", "no-such-host.invalid"):
        assert not is_loopback(host), host


def test_serve_beyond_loopback_takes_the_token_from_the_environment(
        searcher, free_port, capsys, monkeypatch):
    """--host 0.0.0.0 with SCVNET_SEARCH_TOKEN set: it serves, the app it serves wants the
    token, and the line it prints says so."""
    import uvicorn
    from fastapi.testclient import TestClient

    from scvnet_jax.app import cli as app_cli
    monkeypatch.setattr(app_cli, "_index_and_model",
                        lambda args: (searcher.index, searcher.model))
    monkeypatch.setenv("SCVNET_SEARCH_TOKEN", "from-the-env")
    apps, served = [], []
    monkeypatch.setattr(uvicorn, "Config", lambda app, **kw: apps.append(app) or kw)
    monkeypatch.setattr(uvicorn, "Server", lambda config: type(
        "Served", (), {"run": lambda self, sockets: served.extend(sockets)})())
    port = free_port()
    assert main(["serve", "--index", "i.index", "--host", "0.0.0.0", "--port", str(port)]) == 0
    assert "requests need the token" in capsys.readouterr().out
    served[0].close()
    c = TestClient(apps[0])
    assert c.get("/api/health").status_code == 401
    assert c.get("/api/health", headers={"Authorization": "Bearer from-the-env"}).json()[
        "status"] == "ok"
    # --token wins over the environment
    assert main(["serve", "--index", "i.index", "--host", "0.0.0.0", "--port", str(port),
                 "--token", "flag"]) == 0
    served[1].close()
    c = TestClient(apps[1])
    assert c.get("/api/health", headers={"Authorization": "Bearer flag"}).status_code == 200
    assert c.get("/api/health", headers={"Authorization": "Bearer from-the-env"}
                 ).status_code == 401


def test_serve_refuses_a_port_in_use_then_listens_on_the_one_it_names(
        searcher, free_port, capsys, one_error_line, monkeypatch):
    """A port in use: one error before the model loads. A free one: the socket bound then
    is the one uvicorn serves on (the port printed is the port listened on)."""
    import socket

    import uvicorn

    from scvnet_jax.app import cli as app_cli
    loaded = []
    monkeypatch.setattr(app_cli, "_index_and_model",
                        lambda args: loaded.append(1) or (searcher.index, searcher.model))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--index", "i.index", "--port", str(port)]) == 2
    one_error_line(capsys.readouterr().err, f"--host 127.0.0.1 --port {port}: cannot listen "
                   "there (Address already in use)")
    assert not loaded
    served = []     # (uvicorn.Config would set up logging: pytest's handlers closed)
    monkeypatch.setattr(uvicorn, "Config", lambda app, **kw: kw)
    monkeypatch.setattr(uvicorn, "Server", lambda config: type(
        "Served", (), {"run": lambda self, sockets: served.extend(sockets)})())
    port = free_port()
    assert main(["serve", "--index", "i.index", "--port", str(port)]) == 0
    assert f"at http://127.0.0.1:{port}/ " in capsys.readouterr().out
    assert len(served) == 1 and served[0].getsockname() == ("127.0.0.1", port)
    # listening before "serving" is printed: a first request waits, it is not refused
    assert served[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    served[0].close()


def test_options_of_the_wrong_type_in_python(tmp_path):
    """Index.search(options={"M": "abc"}): one InputError naming the option, before any
    image is read (no model is needed to say it)."""
    query = tmp_path / "q.jpg"
    query.write_bytes(b"not read")
    index = sj.search.Index([str(query)], np.ones((1, 4), np.float32))
    for rerank, options, message in [
            ("superglobal", {"M": "abc"}, "option M = 'abc', expected an integer >= 1"),
            ("ames", {"k": "x"}, "option k = 'x', expected an integer >= 1"),
            ("csa", {"topk": 2.5}, "option topk = 2.5, expected an integer >= 1")]:
        with pytest.raises(sj.errors.InputError, match=message.replace("(", r"\(")):
            index.search(None, str(query), rerank=rerank, options=options)


def test_names_that_are_not_utf8(demo_benchmark, tmp_path, capsys):
    """A collection holding a file whose name is not UTF-8 (Linux bytes): indexed, and a
    query that hits it answers, as a table and as JSON, the name's odd byte as \\xe9."""
    import os

    photos = tmp_path / "photos"
    photos.mkdir()
    jpg = sorted((demo_benchmark / "demo" / "jpg").glob("coins_*"))
    shutil.copy(jpg[0], photos / jpg[0].name)
    odd = os.fsdecode(os.fsencode(photos) + b"/caf\xe9.jpg")
    shutil.copy(jpg[1], odd)
    index = tmp_path / "i.index"
    assert main(["index", str(photos), "--index", str(index)]) == 0
    assert ": 2 images (0 reused, 2 extracted" in capsys.readouterr().out
    shown = f"{photos}/caf\\xe9.jpg"
    assert main(["query", "--index", str(index), odd, "-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith(f"{shown}  (rerank none; 2 images")
    assert shown in [ln.split()[2] for ln in table[2:4]]
    assert main(["query", "--index", str(index), odd, "-k", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["query"] == shown and shown in [h["path"] for h in got["hits"]]


def test_unreadable_queries_moved_and_deleted_files(photos, tmp_path, capsys):
    """One unreadable query among three is reported and the other two answered (exit 2);
    hits whose files were deleted are left out and said; a collection moved without --root
    and a text file given as --index are one error line each."""
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    index = tmp_path / "my.index"
    assert main(["index", str(folder), "--index", str(index)]) == 0
    capsys.readouterr()
    a, b, c = sorted(folder.rglob("*.jpg"))[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(a.read_bytes()[:200])
    assert main(["query", "--index", str(index), str(a), str(broken), str(c), "--json",
                 "-k", "3"]) == 2
    out, err = capsys.readouterr()
    assert [json.loads(ln)["query"] for ln in out.splitlines()] == [str(a), str(c)]
    assert err.count("error: ") == 1 and "broken.jpg: cannot read the image" in err, err

    a_copy = tmp_path / "a.jpg"
    shutil.copy(a, a_copy)
    a.unlink()                                      # deleted after indexing
    assert main(["query", "--index", str(index), str(a_copy), "--json", "-k", "3"]) == 0
    out, err = capsys.readouterr()
    got = json.loads(out)
    assert got["missing"] == [str(a)] and str(a) not in [h["path"] for h in got["hits"]]
    assert len(got["hits"]) == 3 and "1 indexed file(s) no longer exist" in err, err

    folder.rename(tmp_path / "moved")
    assert main(["query", "--index", str(index), str(a_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no longer exists" in err and "--root" in err, err
    assert main(["query", "--index", str(index), str(a_copy), "--root",
                 str(tmp_path / "moved")]) == 0
    capsys.readouterr()

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert main(["query", "--index", str(notes), str(a_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "notes.txt: cannot read the search index" in err, err
    assert "pickle" not in err, err


@pytest.mark.parametrize("args, message", [
    (["query", "--index", "{index}", "{query}", "--rerank", "csa"],
     "--rerank csa needs weights: --option weights=MODEL"),
    (["query", "--index", "{index}", "{query}", "--rerank", "ames"],
     "--rerank ames needs weights: --option weights=MODEL"),
    (["query", "--index", "{index}", "{query}", "--rerank", "csa", "--option",
      "weights={tmp}/none"], "--option weights {tmp}/none: no such file"),
    (["serve", "--index", "{index}", "--csa_weights", "{tmp}/none"],
     "--csa_weights {tmp}/none: no such file"),
    (["serve", "--index", "{index}", "--ames_weights", "{tmp}/none"],
     "--ames_weights {tmp}/none: no such file"),
])
def test_missing_reranker_weights_are_found_before_the_model_loads(args, message, tmp_path,
                                                                    monkeypatch, capsys):
    from scvnet_jax.app import cli

    def no(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(cli, "_load", no)
    monkeypatch.setattr(cli, "_index_and_model", no)
    query = tmp_path / "q.jpg"
    query.write_bytes(b"")
    args = [a.format(index=tmp_path / "my.index", query=query, tmp=tmp_path) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message.format(tmp=tmp_path) \
        in err, err


def test_duplicates_table_json_and_csv(photos, tmp_path, capsys):
    """A collection with a copy of one photo and a re-encoded copy of another: both pairs
    are groups (the copy by its content as well), as a table, JSON and CSV; nothing else
    is grouped at a threshold above the different photos' similarities."""
    import csv
    import io

    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    a, b = sorted(folder.rglob("*.jpg"))[:2]
    shutil.copy(a, folder / "copy_of_a.jpg")
    im = cv2.imread(str(b))
    cv2.imwrite(str(folder / "reencoded_b.jpg"), im, [cv2.IMWRITE_JPEG_QUALITY, 60])
    index = tmp_path / "d.index"
    assert main(["index", str(folder), "--index", str(index)]) == 0
    capsys.readouterr()
    assert main(["duplicates", "--index", str(index), "--threshold", "0.999", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 14 and res["threshold"] == 0.999 and res["k"] == 10
    groups = [sorted(Path(im["path"]).name for im in g["images"]) for g in res["groups"]]
    assert sorted(groups) == sorted([sorted([a.name, "copy_of_a.jpg"]),
                                     sorted([b.name, "reencoded_b.jpg"])]), groups
    identical = {Path(g["images"][0]["path"]).name in (a.name, "copy_of_a.jpg"):
                 g["identical"] for g in res["groups"]}
    assert identical == {True: True, False: False}
    assert main(["duplicates", "--index", str(index), "--threshold", "0.999"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{index}: 2 groups of near-identical photos (4 of 14 photos; "
                             "cosine >= 0.999 among 10 nearest neighbours; search exact; ")
    assert any("the same file content" in ln for ln in out)
    assert main(["duplicates", "--index", str(index), "--threshold", "0.999", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 4 and set(rows[0]) == {"group", "id", "path", "best", "weakest_link",
                                               "identical"}
    assert sorted(r["group"] for r in rows) == ["1", "1", "2", "2"]


@pytest.mark.slow   # ~15-20 s: the everyday loop stays within 4 minutes
def test_query_explain_writes_why_each_hit_matched(photos, tmp_path, capsys, monkeypatch,
                                                   one_error_line):
    """query --explain DIR: one picture per hit (DIR/<query stem>/<rank>_<hit stem>.jpg,
    the two photos side by side with a line per pair), each hit's inliers in the table and
    the JSON, equal to rerank.spatial's; a DIR that is a file is refused before the model."""
    from scvnet_jax.rerank import spatial

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    index = tmp_path / "my.index"
    assert main(["index", str(photos), "--index", str(index)]) == 0
    query = sorted(photos.rglob("astronaut_*"))[0]
    why = tmp_path / "why"
    capsys.readouterr()
    assert main(["query", "--index", str(index), str(query), "-k", "3", "--json",
                 "--explain", str(why)]) == 0
    got = json.loads(capsys.readouterr().out)
    pictures = sorted((why / query.stem).iterdir())
    assert [p.name for p in pictures] == [f"{i:02d}_{Path(h['path']).stem}.jpg"
                                         for i, h in enumerate(got["hits"], 1)]
    model = sj.load(sj.demo_model_path())
    for h, pic in zip(got["hits"], pictures):
        assert h["explanation"] == str(pic)
        want = spatial.explain_images(model, query, h["path"])
        assert h["inliers"] == want.inliers
        im = cv2.imread(str(pic))
        assert im.shape[0] > 400 and im.shape[1] > 2 * im.shape[0] * 0.5
        green = (im[..., 1] > 150) & (im[..., 0] < 90) & (im[..., 2] < 90)
        assert (green.sum() > 50) == (want.inliers > 0)
    assert got["hits"][0]["path"] == str(query.resolve())
    assert got["hits"][0]["inliers"] >= 100                # itself: every point kept
    assert main(["query", "--index", str(index), str(query), "-k", "2", "--explain",
                 str(why)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["rank", "score", "inliers", "path"]
    assert int(table[2].split()[2]) == got["hits"][0]["inliers"]
    assert table[4] == f"  why they matched: {why / query.stem}/ (one picture per hit)"
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr("scvnet_jax.app.cli._load", lambda w: pytest.fail("model loaded"))
    assert main(["query", "--index", str(index), str(query), "--explain",
                 str(tmp_path / "afile")]) == 2
    one_error_line(capsys.readouterr().err, f"--explain {tmp_path / 'afile'}: is a file; "
                   "expected a folder (made if missing)")
