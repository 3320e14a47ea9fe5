"""scvnet-search serve: the REST API against sj.search, bad requests as JSON 4xx, images by
id only, the page and its files shipped in the package, and 200 requests at 8 at a time on
a live server."""
import re
import time
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
                 'id="grid"', "/static/app.js", "/static/style.css"):
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
        ({"files": {"image": ("big.png", big.read_bytes(), "image/png")}}, 400, "above the "
         "limit of 0.190735 MB"),
        ({"files": _upload(query), "params": {"k": 0}}, 400, "k must be an integer in"),
        ({"files": _upload(query), "params": {"k": "x"}}, 422, "k"),
        ({"files": _upload(query), "params": {"rerank": "magic"}}, 400, "rerank must be none"),
        ({"files": _upload(query), "params": {"box": "1,2,3"}}, 400, "box must be x1,y1,x2,y2"),
        ({"files": _upload(query), "params": {"box": "500,500,900,900"}}, 400, "crops nothing"),
        ({"files": _upload(query), "params": {"regions": 99}}, 400, "regions must be"),
        ({"params": {"id": 10 ** 6}}, 400, "no indexed image with this id"),
        ({}, 400, "give an image"),
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
