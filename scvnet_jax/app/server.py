"""`scvnet-search serve`: one index and its model, loaded once, behind a web page and a REST
API (FastAPI; every script and style is shipped in this package, nothing from a CDN).

    GET  /                 the page: drop or choose an image, draw a box, see the regions,
                           choose the reranker and k, see the hits; click one to search with it
    GET  /api/health       {"status": "ok", "images": N, "family": ..., "weights": ...}
    POST /api/search       multipart field `image` (or query parameter `id`: an indexed image),
                           query parameters k, rerank, rerank_k, regions, box=x1,y1,x2,y2
                           -> {"query", "rerank", ["box"], ["regions"], "hits": [{"id",
                           "path", "score"}], "missing": [paths of indexed files that are
                           gone, left out], "timings": {"search_ms", "total_ms"}}
    GET  /api/image/{id}   an indexed image, by its id only (no paths: nothing else is served)
    GET  /docs             the OpenAPI documentation

Bad requests (not an image, corrupt or truncated, over the pixel limit, too large an upload,
an unknown reranker, k < 1, a bad box) get HTTP 4xx with {"error": "..."}, never a 500.
Searches run on the loaded model in two lanes, each one search at a time (a lock): the
rerankers that read database images again (cvnet, ames: seconds per candidate) in one, every
other search in the other, so a plain search never waits behind such a rerank; at most two
searches are in memory at once. Rerankers that need weights of their own (csa, ames) are
offered only when the server was given them (`serve --csa_weights / --ames_weights`).
"""

import os
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

from scvnet_jax.errors import InputError

STATIC = ("app.js", "style.css")
MAX_UPLOAD_BYTES = 20 << 20


class Searcher:
    """The index and the model, loaded once; `search` is what POST /api/search does."""

    def __init__(self, index, model, *, batch_size: int = 0, bucket: int = 64,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, shortlist: int = 1000,
                 reranker_options: dict | None = None):
        from scvnet_jax.rerank import registry
        self.index, self.model, self.shortlist = index, model, shortlist
        # name -> options (e.g. {"csa": {"weights": path}}): a reranker that needs weights
        # is offered only with them
        self.reranker_options = {n: dict(o) for n, o in (reranker_options or {}).items()}
        self.rerankers = [n for n in registry.names() if not registry.get(n).needs_weights
                          or self.reranker_options.get(n, {}).get("weights")]
        self.ids = {p: i for i, p in enumerate(index.paths)}   # hit path -> id, built once
        self.batch_size, self.bucket = batch_size, bucket
        self.max_upload_bytes = max_upload_bytes
        self.lock = threading.Lock()            # plain searches and light rerankers
        self.rerank_lock = threading.Lock()     # rerankers that read the database images

    def search(self, *, data: bytes | None = None, filename: str = "upload", id=None,
               k: int = 10, rerank: str = "none", regions: int = 0, box=None,
               rerank_k: int = 100) -> dict:
        from scvnet_jax.images import decode_image
        from scvnet_jax.rerank import registry

        t0 = time.perf_counter()
        if (data is None) == (id is None):
            raise InputError("give an image (multipart field 'image') or the id of an "
                             "indexed image (query parameter 'id'), not both")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
            raise InputError(f"k must be an integer in [1, 1000], got {k!r}")
        if isinstance(regions, bool) or not isinstance(regions, int) or not 0 <= regions <= 20:
            raise InputError(f"regions must be an integer in [0, 20], got {regions!r}")
        if isinstance(rerank_k, bool) or not isinstance(rerank_k, int) or \
                not 1 <= rerank_k <= 1000:
            raise InputError(f"rerank_k must be an integer in [1, 1000], got {rerank_k!r}")
        if rerank != "none" and rerank not in registry.names():
            raise InputError(f"rerank must be none or one of {', '.join(self.rerankers)}, "
                             f"got {rerank!r}")
        if rerank != "none" and rerank not in self.rerankers:
            raise InputError(f"rerank {rerank} needs weights, and this server has none for "
                             f"it: start it with --{rerank}_weights MODEL")
        box = parse_box(box) if isinstance(box, str) else box
        with tempfile.TemporaryDirectory(prefix="scvnet-query-") as tmp:
            if id is not None:
                try:
                    path = name = self.path_of(id)
                except KeyError:
                    raise InputError(f"id {id!r}: no indexed image with this id (0 to "
                                     f"{len(self.index) - 1})") from None
            else:
                if len(data) > self.max_upload_bytes:
                    raise InputError(f"{filename}: the upload is {len(data) / 2**20:.1f} MB, "
                                     f"above the limit of {self.max_upload_bytes / 2**20:g} MB")
                decode_image(data, filename)            # refused here, before any work
                path = os.path.join(tmp, "query" + (Path(filename).suffix.lower()[:6]
                                                    or ".jpg"))
                Path(path).write_bytes(data)
                name = filename
            options = dict(k=k, rerank=None if rerank == "none" else rerank,
                           rerank_k=rerank_k, options=self.reranker_options.get(rerank),
                           batch_size=self.batch_size, bucket=self.bucket,
                           shortlist=self.shortlist)
            slow = rerank != "none" and registry.get(rerank).needs_images
            with self.rerank_lock if slow else self.lock:
                t1 = time.perf_counter()
                if regions or box is not None:
                    hits, found = self.index.search_regions(self.model, path, regions=regions,
                                                            box=box, **options)
                else:
                    hits, found = self.index.search(self.model, path, **options)[0], []
                t2 = time.perf_counter()
        out = {"query": name, "rerank": rerank}
        if box is not None:
            out["box"] = list(box)
        if regions:
            out["regions"] = [list(r) for r in found]
        out["hits"] = [{"id": self.ids[h.path], "path": h.path, "score": round(h.score, 6)}
                       for h in hits]
        out["missing"] = list(getattr(hits, "missing", ()))
        out["timings"] = {"search_ms": round(1000 * (t2 - t1), 1),
                          "total_ms": round(1000 * (time.perf_counter() - t0), 1)}
        return out

    def path_of(self, id) -> str:
        if isinstance(id, bool) or not isinstance(id, int) or not 0 <= id < len(self.index):
            raise KeyError(id)
        return self.index.paths[id]


def parse_box(text: str) -> tuple[float, ...]:
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
        raise InputError(f"box must be x1,y1,x2,y2 with 0 <= x1 < x2 and 0 <= y1 < y2 "
                         f"(pixels), got {text!r}")
    return box


def create_app(searcher: Searcher):
    """The FastAPI application over `searcher`."""
    from fastapi import FastAPI, File, Query, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

    from scvnet_jax.errors import ScvnetError

    app = FastAPI(title="scvnet-search", description="Search an indexed photo collection "
                  "by image or region (scvnet_jax).", docs_url="/docs")
    static = resources.files("scvnet_jax.app") / "static"

    @app.exception_handler(ScvnetError)
    async def _bad_input(request, e: ScvnetError):
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request, e: RequestValidationError):
        errs = "; ".join(f"{'.'.join(str(v) for v in err.get('loc', ()))}: {err.get('msg')}"
                         for err in e.errors())
        return JSONResponse({"error": errs or "bad request"}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):    # a bug: still JSON, and said so
        return JSONResponse({"error": f"internal error ({type(e).__name__}: {e})"},
                            status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return page_html(searcher, searcher.rerankers)

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str):
        if name not in STATIC:
            return JSONResponse({"error": f"no static file {name!r}"}, status_code=404)
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return Response((static / name).read_bytes(), media_type=kind)

    @app.get("/api/health")
    def health():
        ix = searcher.index
        return {"status": "ok", "images": len(ix), "family": ix.family,
                "weights": ix.weights, "dtype": ix.descriptors.dtype.name,
                "backend": "exact" if ix.backend is None else
                f"{ix.backend.name} {getattr(ix.backend, 'kind', '')}".strip(),
                "recall_at_10": ix.recall_at_10,
                "rerankers": ["none", *searcher.rerankers]}

    @app.post("/api/search")
    async def search(image: UploadFile | None = File(None),
                     id: int | None = Query(None, description="search with indexed image id"),
                     k: int = Query(10, description="hits to return (1..1000)"),
                     rerank: str = Query("none", description="none or a registry reranker"),
                     rerank_k: int = Query(100, description="candidates the cvnet, csa and "
                                           "ames rerankers re-order (1..1000)"),
                     regions: int = Query(0, description="regions of the query to search too"),
                     box: str | None = Query(None, description="x1,y1,x2,y2: search a crop")):
        data = None
        if image is not None:
            data = await image.read(searcher.max_upload_bytes + 1)
        import anyio
        return await anyio.to_thread.run_sync(lambda: searcher.search(
            data=data, filename=(image.filename or "upload") if image else "upload", id=id,
            k=k, rerank=rerank, regions=regions, box=box, rerank_k=rerank_k))

    @app.get("/api/image/{id}")
    def image_file(id: int):
        try:
            path = searcher.path_of(id)
        except KeyError:
            return JSONResponse({"error": f"no indexed image with id {id}"}, status_code=404)
        if not os.path.isfile(path):
            return JSONResponse({"error": f"image {id} is no longer at {path}"},
                                status_code=404)
        return FileResponse(path)

    return app


def page_html(searcher: Searcher, rerankers) -> str:
    """The page, rendered on the server (the index's facts and the reranker list)."""
    from html import escape
    ix = searcher.index
    opts = "".join(f'<option value="{escape(n)}">{escape(n)}</option>'
                   for n in ["none", *rerankers])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>scvnet-search</title><link rel="stylesheet" href="/static/style.css"></head>
<body>
<header><h1>scvnet-search</h1>
<p id="facts">{len(ix)} images &middot; {escape(ix.family)} descriptors &middot;
model {escape(ix.weights or 'unknown')} &middot; <a href="/docs">API</a></p></header>
<main>
<section id="query">
  <div id="drop" tabindex="0">Drop an image here or
    <label class="button">choose a file<input id="file" type="file" accept="image/*"></label>
  </div>
  <div id="stage" hidden><canvas id="canvas"></canvas>
    <p class="hint">Drag on the image to search a region; <button id="clearbox"
    type="button">clear box</button></p></div>
  <form id="controls">
    <label>reranker <select id="rerank" name="rerank">{opts}</select></label>
    <label>k <input id="k" name="k" type="number" min="1" max="1000" value="10"></label>
    <label>regions <input id="regions" name="regions" type="number" min="0" max="20"
      value="0"></label>
    <button id="search" type="submit" disabled>Search</button>
  </form>
  <p id="status" role="status"></p>
</section>
<section id="results"><div id="grid"></div></section>
</main>
<script src="/static/app.js"></script>
</body></html>
"""
