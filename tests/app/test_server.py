"""scvnet-search serve: the REST API against sj.search, bad requests as JSON 4xx, images by
id only, the page and its files shipped in the package, and 200 requests at 8 at a time on
a live server."""
import os
import re
import shutil
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax.app import server


@pytest.fixture(scope="module")
def client(searcher):
    from fastapi.testclient import TestClient
    return TestClient(server.create_app(searcher))


def _upload(path):
    return {"image": (path.name, path.read_bytes(), "image/jpeg")}


def test_search_matches_the_library(client, searcher, tmp_path):
    ix = searcher.index
    query = sj.search.list_images(ix.root)[7]
    r = client.post("/api/search", params={"k": 4, "rerank": "superglobal"},
                    files=_upload(query))
    assert r.status_code == 200, r.text
    got = r.json()
    want = ix.search(searcher.model, str(query), k=4, rerank="superglobal")[0]
    assert got["query"] == query.name and got["rerank"] == "superglobal"
    assert [h["path"] for h in got["hits"]] == [h.path for h in want]
    assert [ix.paths[h["id"]] for h in got["hits"]] == [h.path for h in want]
    np.testing.assert_allclose([h["score"] for h in got["hits"]], [h.score for h in want],
                               atol=1e-6)
    assert got["timings"]["total_ms"] >= got["timings"]["search_ms"] > 0
    by_id = client.post("/api/search", params={"id": 7, "k": 4, "rerank": "superglobal"})
    assert [h["id"] for h in by_id.json()["hits"]] == [h["id"] for h in got["hits"]]
    regions = client.post("/api/search", params={"id": 7, "k": 3, "regions": 2}).json()
    hits, found = ix.search_regions(searcher.model, ix.paths[7], k=3, regions=2)
    assert regions["regions"] == [list(b) for b in found]
    assert [h["path"] for h in regions["hits"]] == [h.path for h in hits]
    x1, y1, x2, y2 = found[0]
    boxed = client.post("/api/search", params={"id": 7, "k": 3, "box": f"{x1},{y1},{x2},{y2}"})
    want = ix.search(searcher.model, ix.paths[7], k=3, boxes=[found[0]])[0]
    assert [h["path"] for h in boxed.json()["hits"]] == [h.path for h in want]


def test_health_images_and_the_page(client, searcher):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["images"] == len(searcher.index)
    assert health["rerankers"][0] == "none" and "superglobal" in health["rerankers"]
    assert health["max_side"] == searcher.index.max_side     # the working size
    r = client.get("/api/image/3")
    assert r.status_code == 200 and r.content == open(searcher.index.paths[3], "rb").read()
    for bad in ("/api/image/999", "/api/image/-1"):
        assert client.get(bad).status_code == 404 and "error" in client.get(bad).json()
    for bad in ("/api/image/..%2F..%2Fetc%2Fpasswd", "/api/image/abc", "/static/../server.py",
                "/static/server.py"):
        r = client.get(bad)
        assert r.status_code in (404, 422) and "/etc/passwd" not in r.text, bad
    page = client.get("/").text
    for part in ('id="file"', 'id="canvas"', 'id="rerank"', 'id="k"', 'id="regions"',
                 'id="grid"', 'id="rerank_k"', 'id="viewer"', "/static/app.js",
                 "/static/style.css"):
        assert part in page
    assert f"{len(searcher.index)} images" in page
    for name in server.STATIC:
        body = client.get(f"/static/{name}").text
        assert len(body) > 500
        assert not re.search(r"https?://", body), f"{name} loads something from elsewhere"
    assert not re.search(r"(src|href)=\"https?://", page)
    assert client.get("/docs").status_code == 200
    assert "/api/search" in client.get("/openapi.json").json()["paths"]


def test_bad_requests_are_json_4xx(client, searcher, tmp_path):
    query = sj.search.list_images(searcher.index.root)[0]
    data = query.read_bytes()
    big = tmp_path / "big.png"
    import cv2
    cv2.imwrite(str(big), np.random.default_rng(0).integers(0, 255, (400, 400, 3), np.uint8))
    cases = [
        ({"files": {"image": ("notes.txt", b"hello", "text/plain")}}, 400, "notes.txt: cannot "
         "read the image"),
        ({"files": {"image": ("cut.jpg", data[:len(data) // 2], "image/jpeg")}}, 400,
         "cut.jpg: cannot read the image"),
        ({"files": {"image": ("big.png", big.read_bytes(), "image/png")}}, 413, "above the "
         "limit of 0.190735 MB"),
        ({"files": _upload(query), "params": {"k": 0}}, 400, "k must be an integer in"),
        ({"files": _upload(query), "params": {"k": "x"}}, 422, "k"),
        ({"files": _upload(query), "params": {"rerank": "magic"}}, 400, "rerank must be none"),
        ({"files": _upload(query), "params": {"box": "1,2,3"}}, 400, "box must be x1,y1,x2,y2"),
        ({"files": _upload(query), "params": {"box": "500,500,900,900"}}, 400, "crops nothing"),
        ({"files": _upload(query), "params": {"regions": 99}}, 400, "regions must be"),
        ({"params": {"id": 10 ** 6}}, 400, "no indexed image with this id"),
        ({}, 400, "the multipart field 'image' (the image file) is missing"),
        ({"files": _upload(query), "params": {"id": 1}}, 400, "not both"),
    ]
    for kwargs, status, message in cases:
        r = client.post("/api/search", **kwargs)
        assert r.status_code == status, (kwargs.get("params"), r.text)
        assert message in r.json()["error"], r.json()
    from scvnet_jax import images
    try:
        images.set_max_pixels(100 * 100)
        r = client.post("/api/search", files=_upload(query))
        assert r.status_code == 400 and "megapixels" in r.json()["error"]
    finally:
        images.set_max_pixels(images.DEFAULT_MAX_PIXELS)


def test_an_exif_rotated_upload_is_searched_upright(client, searcher):
    """A phone photo stored sideways with EXIF orientation 6 (a 400 "corrupt file" before)
    is searched as shown, with a box in its upright pixels."""
    import io

    from PIL import Image
    query = sj.search.list_images(searcher.index.root)[7]
    im = Image.open(query)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", exif=exif, quality=95)
    phone = {"image": ("phone.jpg", buf.getvalue(), "image/jpeg")}
    r = client.post("/api/search", params={"k": 3}, files=phone)
    assert r.status_code == 200, r.text
    upright = client.post("/api/search", params={"k": 3}, files=_upload(query)).json()
    assert [h["id"] for h in r.json()["hits"]] == [h["id"] for h in upright["hits"]]
    w, h = im.size
    r = client.post("/api/search", params={"k": 3, "box": f"0,0,{w},{h // 2}"}, files=phone)
    assert r.status_code == 200, r.text
    r = client.post("/api/search", params={"k": 3, "box": f"{w},0,{w + 5},5"}, files=phone)
    assert r.status_code == 400 and f"crops nothing from this {w}x{h} image" in r.text


_QUERY_IN_A_FRESH_PROCESS = """
import sys
from pathlib import Path
import scvnet_jax as sj
from scvnet_jax.app import server
searcher = server.Searcher(sj.search.Index.load(sys.argv[1]), sj.load(sj.demo_model_path()),
                           max_upload_bytes=1 << 30)
for q in sys.argv[2:]:
    hits = searcher.search(data=Path(q).read_bytes(), filename=Path(q).name, k=3)["hits"]
    assert len(hits) == 3, hits
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) // 1024)
"""


def test_large_uploads_are_searched_in_bounded_memory(searcher, tmp_path):
    """A 4000x4000 PNG (of one colour: 60 kB) and a 36 MP JPEG (square too: one size to
    compile), one after the other, in a server process: described at the working size
    (1024 px), they peak under 1.5 GB (before: 5.9 GB for the PNG, 6.9 GB for a 24 MP JPEG,
    and the server aborted). VmHWM, not ru_maxrss: Linux carries a parent's ru_maxrss over
    to its children."""
    import os
    import subprocess
    import sys

    import cv2
    png, jpeg = tmp_path / "flat.png", tmp_path / "phone.jpg"
    cv2.imwrite(str(png), np.full((4000, 4000, 3), 128, np.uint8))
    small = np.random.default_rng(0).integers(0, 255, (60, 60, 3), np.uint8)
    cv2.imwrite(str(jpeg), cv2.resize(small, (6000, 6000), interpolation=cv2.INTER_CUBIC))
    index = searcher.index.save(tmp_path / "photos.index")
    p = subprocess.run([sys.executable, "-c", _QUERY_IN_A_FRESH_PROCESS, str(index), str(png),
                        str(jpeg)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0, p.stderr[-2000:]
    peak_mb = int(p.stdout.split()[-1])
    assert peak_mb < 1500, peak_mb
    print(f"peak {peak_mb} MB")


def test_live_server_takes_200_requests_8_at_a_time(searcher, live_server):
    """uvicorn on localhost: uploads, searches by id, images and health checks, 8 at a time:
    no errors, and the server still answers after."""
    import httpx

    base = live_server
    query = sj.search.list_images(searcher.index.root)[2].read_bytes()
    searcher.search(id=2, k=5)     # compiled before the clock starts

    def request(i):
        with httpx.Client(base_url=base, timeout=120) as c:
            kind = i % 4
            if kind == 0:
                r = c.post("/api/search", params={"k": 5},
                           files={"image": ("q.jpg", query, "image/jpeg")})
            elif kind == 1:
                r = c.post("/api/search", params={"id": i % len(searcher.index), "k": 5})
            elif kind == 2:
                r = c.get(f"/api/image/{i % len(searcher.index)}")
            else:
                r = c.get("/api/health")
            return r.status_code
    t0 = time.time()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(request, range(200)))
    seconds = time.time() - t0
    assert codes == [200] * 200, sorted(set(codes))
    assert httpx.get(base + "/api/health").json()["status"] == "ok"
    print(f"200 requests, 8 at a time: {seconds:.1f} s")


def test_thumbnails_browser_formats_and_originals(client, searcher, collection, tmp_path):
    """Hits are shown as thumbnails (upright JPEG, longest side 256, revalidated by ETag),
    a TIFF is served as a JPEG the browser shows, and the untouched file is a download."""
    import cv2
    from fastapi.testclient import TestClient

    full = cv2.imread(searcher.index.paths[3])
    r = client.get("/api/thumb/3")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert max(thumb.shape[:2]) == min(256, max(full.shape[:2]))
    assert abs(thumb.shape[1] / thumb.shape[0] - full.shape[1] / full.shape[0]) < 0.02
    big = tmp_path / "big.jpg"           # (the demo photos are 160 px: kept as they are)
    cv2.imwrite(str(big), cv2.resize(full, (1200, 800)))
    data, etag = searcher.thumbnail(str(big))
    small = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert small.shape == (171, 256, 3) and len(data) < big.stat().st_size / 5
    assert searcher.thumbnail(str(big)) == (data, etag)          # kept
    again = client.get("/api/thumb/3", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and not again.content
    assert client.get("/api/thumb/999").status_code == 404
    original = client.get("/api/original/3")
    assert original.content == open(searcher.index.paths[3], "rb").read()
    assert original.headers["content-disposition"].startswith("attachment")
    assert client.get("/api/original/999").json()["error"].startswith("no indexed image")

    mixed = collection(tmp_path / "photos")
    tif = mixed.index.paths.index(str(tmp_path / "photos" / "c.tif"))
    with TestClient(server.create_app(mixed)) as c:
        r = c.get(f"/api/image/{tif}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        shown = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
        want = cv2.imread(mixed.index.paths[tif])
        assert shown.shape == want.shape and np.abs(shown.astype(int) - want).mean() < 3
        assert c.get(f"/api/original/{tif}").content == open(mixed.index.paths[tif],
                                                             "rb").read()
        assert c.get(f"/api/thumb/{tif}").headers["content-type"] == "image/jpeg"
        jpg = 1 - (tif == 0)
        assert c.get(f"/api/image/{jpg}").content == open(mixed.index.paths[jpg], "rb").read()


def test_thumbnail_cache_is_bounded():
    cache = server._LRU(100)
    for i in range(10):
        cache.put(i, bytes(30))
        assert cache.get(0) is not None       # used: kept
    assert cache.size <= 100 and cache.get(0) is not None and cache.get(1) is None
    assert sorted(cache.items) == [0, 8, 9]


def test_scores_say_what_they_are(client):
    from scvnet_jax.rerank import registry

    first = client.post("/api/search", params={"id": 1, "k": 3}).json()
    assert "cosine similarity" in first["score_kind"]
    assert "not a probability" in first["score_kind"]
    sg = client.post("/api/search", params={"id": 1, "k": 3, "rerank": "superglobal"}).json()
    assert registry.RERANKERS["superglobal"].score in sg["score_kind"]


def test_a_reindexed_collection_is_searched_without_a_restart(collection, tmp_path):
    """Re-indexing into the served index file: the next request searches the new index
    (same model object), found by the file's change, not by a restart."""
    from fastapi.testclient import TestClient

    folder = tmp_path / "photos"
    mixed = collection(folder)
    model, before = mixed.model, len(mixed.index)
    spare = collection.spare
    with TestClient(server.create_app(mixed)) as c:
        r = c.post("/api/search", params={"k": 10}, files=_upload(spare)).json()
        assert len(r["hits"]) == before and r["hits"][0]["score"] < 0.99
        shutil.copy(spare, folder / "new.jpg")
        sj.search.update_index(model, folder, folder / "photos.index", weights="demo")
        assert c.get("/api/health").json()["images"] == before + 1
        r = c.post("/api/search", params={"k": 10}, files=_upload(spare)).json()
        assert r["hits"][0]["path"] == str(folder / "new.jpg") and r["hits"][0]["score"] > 0.99
        assert c.get(f"/api/original/{r['hits'][0]['id']}").content == spare.read_bytes()
        assert f"{before + 1} images" in c.get("/").text
    assert mixed.model is model


def test_a_reload_swaps_the_index_and_its_ids_together(tmp_path):
    """Requests racing a re-index each get one index with its own ids (never the new
    paths with the old ids), and a damaged file leaves the loaded index in use."""
    from scvnet_jax.search import Index

    path = tmp_path / "x.index"

    def write(n):
        Index([f"/p/{n}/{i}.jpg" for i in range(n)], np.eye(n, 8, dtype=np.float32),
              root="/p").save(path)
    write(3)
    s = server.Searcher(Index.load(path), None, index_path=path)
    seen = []

    def read(_):
        index, ids = s.current()
        return ids == {p: i for i, p in enumerate(index.paths)}, len(index)
    with ThreadPoolExecutor(4) as pool:
        for n in range(4, 8):
            write(n)
            seen += pool.map(read, range(50))
    assert all(ok for ok, _ in seen) and s.current()[0].paths[0] == "/p/7/0.jpg"
    path.write_bytes(b"not an index")
    assert len(s.current()[0]) == 7 and s.path_of(6) == "/p/7/6.jpg"



def test_ids_stay_right_with_the_version_they_came_from(tmp_path):
    """A search's ids go with its index version: after re-indexes that move the ids, an id
    with its version still names the same file (the last KEPT_VERSIONS versions), with
    none the served index's; a version no longer kept is one 409 JSON error that says
    to search again. The version is a name for the paths: unchanged paths keep it."""
    from fastapi.testclient import TestClient

    from scvnet_jax.search import Index

    path = tmp_path / "x.index"

    def write(names):
        Index([f"/p/{n}.jpg" for n in names], np.eye(len(names), 8, dtype=np.float32),
              root="/p").save(path)
    write(["b", "c"])
    s = server.Searcher(Index.load(path), None, index_path=path)
    first = s.version
    assert s.path_of(0, version=first) == "/p/b.jpg"
    write(["a", "b", "c"])                        # an added file moves b and c
    assert s.version != first and s.path_of(0) == "/p/a.jpg"
    assert s.path_of(0, version=first) == "/p/b.jpg"
    assert s.path_of(2, version=s.version) == "/p/c.jpg"
    with pytest.raises(KeyError):
        s.path_of(2, version=first)
    write(["a", "b", "c"])                        # rewritten, the same paths: the same name
    s.current()
    assert s.version == server.index_version(s.index)
    assert s.path_of(0, version=first) == "/p/b.jpg"
    for n in range(server.KEPT_VERSIONS):
        write([f"x{n}", "b"])
        s.current()
    with pytest.raises(sj.errors.StaleIdsError, match="search again"):
        s.path_of(0, version=first)
    # bounded: versions that together hold over 4 paths per served path (+ 1000) go
    write([f"y{i}" for i in range(3000)])
    s.current()
    write([f"z{i}" for i in range(10)])
    s.current()
    assert len(s._versions) == 2          # the one before is kept, however large
    old = next(iter(s._versions.values()))
    assert s.path_of(2999, version=next(iter(s._versions))) == "/p/y2999.jpg"
    write([f"z{i}" for i in range(11)])
    s.current()
    assert len(s._versions) == 2 and next(iter(s._versions.values())) is not old
    assert s._versions[s.version][0] is next(iter(s._versions.values()))[0]   # shared
    c = TestClient(server.create_app(s))
    r = c.get("/api/thumb/0", params={"v": first})
    assert r.status_code == 409 and "re-indexed since the search" in r.json()["error"]
    assert c.get("/api/health").json()["version"] == s.version


def test_a_huge_upload_is_refused_while_it_arrives(searcher, live_server):
    """A 2 GB body, with its Content-Length or chunked: 413 with the size or "over the
    limit", after far less than the body was sent (nothing spooled to disk in full)."""
    import httpx

    sent = []
    head = (b'--x\r\nContent-Disposition: form-data; name="image"; filename="huge.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n")

    def body(chunk=b"\xff" * (1 << 20)):        # 2 GB of a JPEG that never ends
        yield head
        for _ in range(2048):
            sent.append(len(chunk))
            yield chunk
    for length, message in [(str(len(head) + (2 << 30)), "the upload is 2048.0 MB, above "
                             "the limit of 0.190735 MB"),
                            (None, "the upload is over the limit of 0.190735 MB (refused "
                             "after 0.")]:
        sent.clear()
        headers = {"content-type": "multipart/form-data; boundary=x"}
        if length:
            headers["content-length"] = length
        r = httpx.post(live_server + "/api/search", content=body(), headers=headers,
                       timeout=120)
        assert r.status_code == 413 and r.json()["error"].startswith(message), r.text
        assert sum(sent) < 64 << 20, f"{sum(sent) / 2**20:.0f} MB sent before the refusal"
        print(f"{sum(sent) / 2**20:.0f} MB of 2048 sent before the refusal")
    assert httpx.get(live_server + "/api/health").json()["status"] == "ok"


def test_errors_speak_the_users_words(client, searcher):
    """Box errors name the uploaded file (not the server's temporary copy); no `image`
    field, or two, is said; unknown routes and methods answer {"error": ...} too."""
    query = sj.search.list_images(searcher.index.root)[0]
    r = client.post("/api/search", params={"box": "500,500,900,900"},
                    files={"image": ("my photo.jpg", query.read_bytes(), "image/jpeg")})
    assert r.status_code == 400 and r.json()["error"].startswith("my photo.jpg: query box ")
    assert "scvnet-query-" not in r.text and "/tmp" not in r.text
    r = client.post("/api/search", files={"file": ("q.jpg", query.read_bytes(), "image/jpeg")})
    assert r.status_code == 400 and "the multipart field 'image' (the image file) is " \
        "missing" in r.json()["error"]
    r = client.post("/api/search", files=[("image", ("a.jpg", query.read_bytes())),
                                          ("image", ("b.jpg", query.read_bytes()))])
    assert r.status_code == 400
    assert r.json() == {"error": "several 'image' fields: send one image per search"}
    for method, route, status, message in [
            ("GET", "/nowhere", 404, "no such page or API route: GET /nowhere (the API: "
             "/docs)"),
            ("GET", "/api/search", 405, "method not allowed: GET /api/search (allowed: "
             "POST)"),
            ("DELETE", "/api/image/1", 405, "method not allowed: DELETE /api/image/1 "
             "(allowed: GET)")]:
        r = client.request(method, route)
        assert r.status_code == status and r.json() == {"error": message}, r.text


def test_docs_load_nothing_from_elsewhere(client):
    """/docs is a page of ours made from the OpenAPI schema: every route and parameter,
    and no URL of another host (FastAPI's Swagger UI loads from a CDN)."""
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.findall(r"(?:https?:)?//[^\s\"'<>]+", page.text)
    for text in ("POST /api/search", "GET /api/image/{id}", "GET /api/health", "rerank",
                 "regions", "box", "x1,y1,x2,y2: search a crop", "the query image",
                 "<td><code>image</code></td><td>multipart body</td><td>file</td>",
                 "/openapi.json"):
        assert text in page.text, text
    assert client.get("/redoc").status_code == 404


def test_names_that_are_not_utf8(searcher, tmp_path):
    """A file whose name is not UTF-8 (Linux bytes): indexed, kept by Index.save/load,
    searched over REST with its name escaped, its image served by id."""
    from fastapi.testclient import TestClient

    photos = tmp_path / "photos"
    photos.mkdir()
    src = sj.search.list_images(searcher.index.root)
    shutil.copy(src[0], photos / src[0].name)
    odd = os.fsdecode(os.fsencode(photos) + b"/caf\xe9.jpg")
    shutil.copy(src[1], odd)
    index, _ = sj.search.update_index(searcher.model, photos, tmp_path / "p.index",
                                      weights="demo")
    assert odd in index.paths and sj.search.Index.load(tmp_path / "p.index").paths == \
        index.paths
    client = TestClient(server.create_app(server.Searcher(index, searcher.model)))
    i = index.paths.index(odd)
    r = client.post("/api/search", params={"id": i, "k": 2})
    assert r.status_code == 200, r.text
    assert {"id": i, "path": f"{photos}/caf\\xe9.jpg"} in [
        {"id": h["id"], "path": h["path"]} for h in r.json()["hits"]]
    assert r.json()["query"] == f"{photos}/caf\\xe9.jpg"
    assert client.get(f"/api/image/{i}").content == src[1].read_bytes()
    r = client.post("/api/search", params={"k": 2}, files=_upload(src[1]))
    assert f"{photos}/caf\\xe9.jpg" in [h["path"] for h in r.json()["hits"]]


def _copy_of(searcher, tmp_path):
    """A searcher over copies of the session searcher's photos (they may be deleted)."""
    import dataclasses
    import shutil
    paths = []
    for i, p in enumerate(searcher.index.paths):
        paths.append(str(tmp_path / f"{i:02d}_{p.rsplit('/', 1)[-1]}"))
        shutil.copy(p, paths[-1])
    index = dataclasses.replace(searcher.index, paths=paths, root=str(tmp_path))
    return server.Searcher(index, searcher.model)


def test_a_deleted_file_drops_out_of_the_cvnet_rerank_and_is_said(searcher, tmp_path):
    """A photo deleted after indexing (here: the query's own copy, the first hit) is not
    read by the cvnet verifier nor returned: the answer lists it under "missing"; rerank_k
    reaches Index.search."""
    copy = _copy_of(searcher, tmp_path)
    query = searcher.index.paths[4]
    gone = copy.index.paths[4]
    import os
    os.remove(gone)
    for rerank in ("none", "cvnet"):
        got = copy.search(data=open(query, "rb").read(), filename="q.jpg", k=4,
                          rerank=rerank, rerank_k=3)
        assert got["missing"] == [gone], got
        assert len(got["hits"]) == 4 and gone not in [h["path"] for h in got["hits"]]
    seen = {}
    real = copy.index.search

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)
    copy.index.search = spy
    copy.search(id=0, k=2, rerank="alpha_qe", rerank_k=7)
    assert seen["rerank_k"] == 7
    assert copy.search(id=0, k=2)["missing"] == []


def test_rerank_k_from_rest(client, searcher, monkeypatch):
    seen = []
    real = searcher.search
    monkeypatch.setattr(searcher, "search", lambda **kw: seen.append(kw) or real(**kw))
    assert client.post("/api/search", params={"id": 1, "k": 2}).status_code == 200
    assert client.post("/api/search", params={"id": 1, "k": 2, "rerank_k": 5}).status_code \
        == 200
    assert [kw["rerank_k"] for kw in seen] == [100, 5]
    for bad in (0, 1001, "x"):
        r = client.post("/api/search", params={"id": 1, "rerank_k": bad})
        assert r.status_code in (400, 422) and "rerank_k" in r.json()["error"], r.text


def test_a_plain_search_answers_while_a_slow_rerank_runs(searcher, monkeypatch):
    """A rerank that reads the images (cvnet: about a second per candidate on real photos)
    runs in its own lane: a plain search started meanwhile answers at once."""
    import dataclasses
    import threading

    from scvnet_jax.rerank import registry
    entered, release = threading.Event(), threading.Event()

    def slow(inp, **options):
        entered.set()
        release.wait(60)
        return registry.Result(inp.ranks, np.take_along_axis(inp.similarity(), inp.ranks,
                                                             axis=0))
    monkeypatch.setitem(registry.RERANKERS, "cvnet",
                        dataclasses.replace(registry.RERANKERS["cvnet"], run=slow))
    reranked = []
    heavy = threading.Thread(target=lambda: reranked.append(
        searcher.search(id=2, k=3, rerank="cvnet")))
    heavy.start()
    try:
        assert entered.wait(120), "the rerank did not start"
        plain = []
        light = threading.Thread(target=lambda: plain.append(searcher.search(id=5, k=3)))
        light.start()
        light.join(30)
        assert plain and not reranked, "the plain search waited for the rerank"
    finally:
        release.set()
        heavy.join(60)
    assert len(reranked) == 1 and len(reranked[0]["hits"]) == 3


def test_rerankers_that_need_weights_are_offered_only_with_them(searcher):
    """csa and ames are absent from the page's menu and /api/health without weights, and
    asking for them says which serve option gives them."""
    from fastapi.testclient import TestClient
    bare = TestClient(server.create_app(searcher))
    assert "csa" not in bare.get("/api/health").json()["rerankers"]
    assert "ames" not in bare.get("/api/health").json()["rerankers"]
    page = bare.get("/").text
    assert 'value="cvnet"' in page and 'value="csa"' not in page and 'value="ames"' not in page
    for name in ("csa", "ames"):
        r = bare.post("/api/search", params={"id": 0, "rerank": name})
        assert r.status_code == 400 and f"--{name}_weights" in r.json()["error"], r.text
    armed = server.Searcher(searcher.index, searcher.model,
                            reranker_options={"csa": {"weights": "some/csa_model"}})
    assert "csa" in armed.rerankers and "ames" not in armed.rerankers
    health = TestClient(server.create_app(armed)).get("/api/health").json()
    assert "csa" in health["rerankers"] and "ames" not in health["rerankers"]


def test_chamfer_is_offered_and_answers(client, tmp_path, monkeypatch):
    """The training-free chamfer reranker needs no weights: in /api/health and the page's
    menu, and a search with it puts the query's own photo first (every local descriptor
    finds itself: score 1)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))       # its descriptor store
    assert "chamfer" in client.get("/api/health").json()["rerankers"]
    assert 'value="chamfer"' in client.get("/").text
    r = client.post("/api/search", params={"id": 1, "k": 3, "rerank": "chamfer",
                                           "rerank_k": 6})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits[0]["id"] == 1 and hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert list((tmp_path / "scvnet_jax").glob("chamfer-locals-*/*.npz"))  # kept by content


def test_a_token_guards_everything_but_the_page_shell(searcher):
    """With a token (serve --token / SCVNET_SEARCH_TOKEN): the API, images and thumbnails
    answer 401 JSON without it or with a wrong one, and serve a request that carries it as a
    bearer header (API clients) or as the page's cookie; the page, its files and the API docs
    stay public, and the page then shows no fact of the collection."""
    from fastapi.testclient import TestClient

    c = TestClient(server.create_app(searcher, token="s3cret-tok"))
    for path in ("/api/health", "/api/image/0", "/api/thumb/0", "/api/original/0"):
        r = c.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"].startswith("no token: this server needs its token"), r.text
        r = c.get(path, headers={"Authorization": "Bearer s3cret-tokX"})
        assert r.status_code == 401 and r.json()["error"].startswith("a wrong token"), path
        assert c.get(path, headers={"Authorization": "Bearer s3cret-tok"}).status_code == 200
    r = c.post("/api/search?id=0&k=3", files={})
    assert r.status_code == 401 and "error" in r.json()
    r = c.post("/api/search?id=0&k=3", headers={"Authorization": "bearer s3cret-tok"})
    assert r.status_code == 200 and len(r.json()["hits"]) == 3
    # the page's cookie (as the page's script sets it: the token URI-encoded)
    c.cookies.set(server.TOKEN_COOKIE, "s3cret-tok")
    assert c.get("/api/thumb/1").status_code == 200
    c.cookies.set(server.TOKEN_COOKIE, "s3cret%2Dtok")      # encodeURIComponent-style
    assert c.get("/api/health").json()["images"] == len(searcher.index)
    c.cookies.clear()
    c.cookies.set(server.TOKEN_COOKIE, "nope")
    assert c.get("/api/health").status_code == 401
    c.cookies.clear()
    page = c.get("/")
    assert page.status_code == 200 and 'id="tokenform"' in page.text
    assert f"{len(searcher.index)} images" not in page.text
    assert f"{searcher.index.family} descriptors" not in page.text
    for path in ["/docs", "/openapi.json"] + [f"/static/{n}" for n in server.STATIC]:
        assert c.get(path).status_code == 200, path
    # no token: nothing asked, the facts on the page as before
    open_page = TestClient(server.create_app(searcher)).get("/").text
    assert f"{len(searcher.index)} images" in open_page


def test_duplicates_from_rest(client, searcher):
    """GET /api/duplicates answers what Index.duplicates finds, with ids the image routes
    serve; bad values are JSON 4xx."""
    want = searcher.index.duplicates(0.97, k=5)
    r = client.get("/api/duplicates", params={"threshold": 0.97, "k": 5})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["images"] == len(searcher.index) and got["k"] == 5 and got["groups"]
    assert [[im["id"] for im in g["images"]] for g in got["groups"]] == [g.ids for g in want]
    for g in got["groups"]:
        for im in g["images"]:
            assert searcher.index.paths[im["id"]] == im["path"]
    assert client.get("/api/duplicates", params={"threshold": 0.97, "k": 5}).json() == got
    for params, code, said in (({"threshold": 2}, 400, "threshold: expected a cosine"),
                               ({"threshold": 0.9, "k": 0}, 400, "k: expected 1..100"),
                               ({"threshold": "x"}, 422, "threshold"), ({}, 422, "threshold")):
        r = client.get("/api/duplicates", params=params)
        assert r.status_code == code and said in r.json()["error"], (params, r.text)


@pytest.mark.slow   # ~15-20 s: the everyday loop stays within 4 minutes
def test_why_a_hit_matched_from_rest(client, searcher, tmp_path, monkeypatch):
    """POST /api/explain: the same correspondences as rerank.spatial.explain_images, by id
    and by upload (points in the files' full-size pixels, inside both photos); an image
    explained against itself keeps most pairs as inliers, a crop of it (box) finds its
    points shifted by the box; bad hits and methods are JSON 4xx."""
    from scvnet_jax.rerank import spatial

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))       # the hits' descriptor store
    ix = searcher.index
    q, h = 0, 1
    r = client.post("/api/explain", params={"id": q, "hit": h})
    assert r.status_code == 200, r.text
    got = r.json()
    want = spatial.explain_images(searcher.model, ix.paths[q], ix.paths[h]).as_dict()
    for key in ("method", "threshold", "query_size", "hit_size", "correspondences",
                "inliers", "pairs"):
        assert got[key] == want[key], key
    assert got["hit"] == {"id": h, "path": ix.paths[h]} and got["ms"] > 0
    assert got["inliers"] == sum(p[5] for p in got["pairs"])
    for qx, qy, hx, hy, cos, _ in got["pairs"]:
        assert 0 <= qx <= got["query_size"][0] and 0 <= qy <= got["query_size"][1]
        assert 0 <= hx <= got["hit_size"][0] and 0 <= hy <= got["hit_size"][1]
        assert -1 <= cos <= 1
    up = client.post("/api/explain", params={"hit": h}, files=_upload(Path(ix.paths[q])))
    assert up.status_code == 200, up.text
    assert up.json()["pairs"] == got["pairs"]
    self_ = client.post("/api/explain", params={"id": h, "hit": h}).json()
    assert self_["inliers"] >= 0.8 * self_["correspondences"] > 0
    w, hgt = self_["query_size"]
    box = [w // 4, hgt // 4, w // 4 + w // 2, hgt // 4 + hgt // 2]
    crop = client.post("/api/explain", params={"id": h, "hit": h,
                                               "box": ",".join(map(str, box))}).json()
    assert crop["box"] == box and crop["inliers"] >= 8
    inl = np.array([p[:4] for p in crop["pairs"] if p[5]])
    assert np.all((inl[:, 0] >= box[0] - 1) & (inl[:, 0] <= box[2] + 1))
    assert np.median(np.abs(inl[:, :2] - inl[:, 2:])) < 20      # the same place, in pixels
    fund = client.post("/api/explain", params={"id": q, "hit": h, "method": "fundamental"})
    assert fund.status_code == 200 and fund.json()["method"] == "fundamental"
    for params, code, said in (({"id": q, "hit": len(ix)}, 400, f"hit {len(ix)}: no indexed"),
                               ({"id": q, "hit": h, "method": "affine"}, 400,
                                "method must be one of homography, fundamental"),
                               ({"hit": h}, 400, "no query"), ({"id": q}, 422, "hit"),
                               ({"id": len(ix), "hit": h}, 400, f"id {len(ix)}: no indexed")):
        r = client.post("/api/explain", params=params)
        assert r.status_code == code and said in r.json()["error"], (params, r.text)
