"""serve --watch (app/watch.py): files added, changed and removed while queries run; every
request answered from one whole index (its ids and paths agree), the new index as a fresh
one would be, an unreadable file skipped and listed."""
import shutil
import threading
import time

import httpx
import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax.app import server
from scvnet_jax.app.watch import Watcher


def _until(predicate, what, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"not within {timeout} s: {what}")


@pytest.mark.slow   # ~15-20 s: the everyday loop stays within 4 minutes
def test_a_changing_folder_is_followed_while_queries_run(tmp_path, demo_benchmark, serve):
    jpg = sorted((demo_benchmark / "demo" / "jpg").glob("*.jpg"))
    first = jpg[::len(jpg) // 10][:10]         # ten different photos
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for p in first[:4]:
        shutil.copy(p, photos / p.name)
    shutil.copy(first[4], photos / "sub" / first[4].name)
    path = photos / "photos.index"            # inside the folder: its own writes are not changes
    model = sj.load(sj.demo_model_path())
    index, _ = sj.search.update_index(model, photos, path, weights="demo")
    searcher = server.Searcher(index, model, index_path=path)
    reports = []
    searcher.watcher = Watcher(searcher, photos, path, settle=0.5, report=reports.append,
                               family="cvnet", weights="demo", backend="exact").start(
                                   initial=False)
    # each path's thumbnails: of every content it has had (one is replaced meanwhile)
    sources = {photos / p.name: [p] for p in first[:4] + first[5:7]}
    sources[photos / first[0].name].append(first[8])
    sources[photos / "sub" / first[4].name] = [first[4]]
    sources[photos / "sub" / "new.jpg"] = [first[7]]
    had = {str(k.resolve()): {searcher.thumbnail(str(src))[0] for src in v}
           for k, v in sources.items()}
    query = first[6]                                       # not in the folder at first
    failures, answered, seen = [], [], set()
    stop = threading.Event()

    def ask(base):
        with httpx.Client(base_url=base, timeout=120) as c:
            while not stop.is_set():
                try:
                    r = c.post("/api/search", params={"k": 100},
                               files={"image": (query.name, query.read_bytes(), "image/jpeg")})
                    out = r.json() if r.status_code == 200 else {}
                    hits = out.get("hits")
                    # one whole index: every image once (a file removed since it was
                    # indexed is left out and said), its ids 0..n-1
                    n = len(hits or []) + len(out.get("missing", []))
                    if hits is None or len({h["id"] for h in hits}) != len(hits) or any(
                            not 0 <= h["id"] < n for h in hits):
                        failures.append((r.status_code, r.text))
                        continue
                    # the images of these hits, by their ids and the index version they
                    # are of, even when the next index is served already
                    for h in hits:
                        im = c.get(f"/api/thumb/{h['id']}", params={"v": out["version"]})
                        gone = im.status_code == 404 and "no longer at" in im.text
                        if not (im.status_code == 200 or gone):
                            failures.append((im.status_code, im.text[:300]))
                        if im.status_code == 200 and im.content not in had[h["path"]]:
                            failures.append(f"thumbnail {h['id']} is not {h['path']}'s")
                    health = c.get("/api/health")
                    if health.status_code != 200:
                        failures.append((health.status_code, health.text[:300]))
                    answered.append(n)
                    seen.update(x["path"] for x in hits)
                except Exception as e:                  # noqa: BLE001 (a failed request)
                    failures.append(repr(e))

    with serve(searcher) as base:
        threads = [threading.Thread(target=ask, args=(base,)) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            health = lambda: httpx.get(base + "/api/health", timeout=60).json()  # noqa: E731
            _until(lambda: len(answered) >= 3, "queries answered")
            for p in first[5:7]:                        # added
                shutil.copy(p, photos / p.name)
            shutil.copy(first[7], photos / "sub" / "new.jpg")
            _until(lambda: health()["images"] == 8, "the added photos indexed")
            before = len(answered)
            shutil.copy(first[8], photos / first[0].name)          # changed content
            (photos / first[1].name).unlink()                       # removed
            (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")   # unreadable
            _until(lambda: (lambda h: h["images"] == 7 and h["watch"]["skipped"]
                            and not h["watch"]["pending"]
                            and not h["watch"]["updating"])(health()),
                   "the change, the removal and the unreadable file")
            _until(lambda: 7 in answered[before:], "queries answered by the new index")
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        watch = health()["watch"]
    assert not failures, failures[:3]
    assert {8, 7} <= set(answered) and set(answered) <= {5, 8, 7}, sorted(set(answered))
    assert watch["error"] is None and watch["updates"] >= 2
    assert [p for p, _ in watch["skipped"]] == [str((photos / "broken.jpg").resolve())]
    assert "cannot read" in watch["skipped"][0][1] or "image" in watch["skipped"][0][1]
    assert any("skipped: " + str((photos / "broken.jpg").resolve()) in r for r in reports)
    # the index served now is what indexing the folder from scratch gives
    fresh, _ = sj.search.update_index(model, photos, tmp_path / "fresh.index", weights="demo")
    now = searcher.current()[0]
    assert now.paths == fresh.paths and len(now) == 7
    # (equal up to float16 rounding: an image's batch-mates differ between the two runs)
    np.testing.assert_allclose(now.descriptors.astype(np.float32),
                               fresh.descriptors.astype(np.float32), rtol=0, atol=1e-3)
    assert str((photos / first[1].name).resolve()) not in now.paths
    searcher.watcher.stop()


def test_changes_that_are_not_images_do_not_reindex(tmp_path):
    """Events for the index's own files and for files that are not images are ignored; an
    image's or a folder's count."""
    from watchdog.events import (DirCreatedEvent, DirModifiedEvent, FileCreatedEvent,
                                 FileDeletedEvent, FileMovedEvent)

    w = Watcher(None, tmp_path, tmp_path / "photos.index")
    for event, counts in ((FileCreatedEvent(str(tmp_path / "photos.index.tmp.jpg")), False),
                          (FileCreatedEvent(str(tmp_path / "photos.index")), False),
                          (FileCreatedEvent(str(tmp_path / "notes.txt")), False),
                          (DirModifiedEvent(str(tmp_path / "a")), False),
                          (FileCreatedEvent(str(tmp_path / "a" / "x.JPG")), True),
                          (FileDeletedEvent(str(tmp_path / "y.png")), True),
                          (FileMovedEvent(str(tmp_path / "y.txt"), str(tmp_path / "y.webp")),
                           True),
                          (DirCreatedEvent(str(tmp_path / "b")), True)):
        w._changed.clear()
        w.dispatch(event)
        assert w._changed.is_set() == counts, event


@pytest.mark.slow   # ~15-20 s: the everyday loop stays within 4 minutes
def test_serve_watch_from_the_command_line(tmp_path, demo_benchmark, free_port):
    """`scvnet-search serve --watch` (its own process): says what it follows, re-indexes
    a photo copied in with the index's own settings and prints what it did."""
    import subprocess
    import sys

    jpg = sorted((demo_benchmark / "demo" / "jpg").glob("*.jpg"))
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in jpg[:3]:
        shutil.copy(p, photos / p.name)
    index = tmp_path / "photos.index"
    sj.search.update_index(sj.load(sj.demo_model_path()), photos, index, weights="demo",
                           dtype="float32")
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "scvnet_jax.app", "serve", "--index",
                                 str(index), "--port", str(port), "--watch"], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"

        def health():
            try:
                return httpx.get(base + "/api/health", timeout=30).json()
            except httpx.TransportError:
                return {}
        _until(lambda: health().get("watch", {}).get("updates"), "the initial update")
        shutil.copy(jpg[-1], photos / "added.jpg")
        h = _until(lambda: (lambda h: h["images"] == 4 and h)(health()), "the added photo")
        assert h["dtype"] == "float32" and h["watch"]["folder"] == str(photos.resolve())
        text = log.read_text()
        serving = [ln for ln in text.splitlines() if ln.startswith("serving ")]
        assert len(serving) == 1 and serving[0].endswith(f"following {photos.resolve()})")
        assert (f"watch: re-indexed {photos.resolve()}: 4 images (3 reused, 1 extracted, 0 "
                "removed, 0 skipped)") in text
    finally:
        proc.terminate()
        proc.wait(30)
