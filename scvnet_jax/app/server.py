"""`scvnet-search serve`: one index and its model, loaded once, behind a web page and a REST
API (FastAPI; every script and style is shipped in this package, nothing from a CDN).

    GET  /                 the page: drop or choose an image, draw a box, see the regions,
                           choose the reranker and k, see the hits; click one to search with it
    GET  /api/health       {"status": "ok", "images": N, "family": ..., "weights": ...}
    POST /api/search       multipart field `image` (or query parameter `id`: an indexed image),
                           query parameters k, rerank, regions, box=x1,y1,x2,y2 ->
                           {"query", "rerank", ["box"], ["regions"], "hits": [{"id", "path",
                           "score"}], "timings": {"search_ms", "total_ms"}}
    GET  /api/image/{id}   an indexed image, by its id only (no paths: nothing else is served)
    GET  /docs             the API's documentation, a page made here from the OpenAPI
                           schema (GET /openapi.json): no script or style from elsewhere

Bad requests (not an image, corrupt or truncated, over the pixel limit, too large an upload,
an unknown reranker, k < 1, a bad box, an unknown route) get HTTP 4xx with {"error": "..."},
never a 500. An upload over the limit is refused while it arrives (413), from its
Content-Length before any byte is read, else once the bytes received pass the limit: it is
never spooled to disk in full. File names that are not UTF-8 (Linux allows any bytes) are
shown with \\xNN escapes for those bytes (`shown`); their images are still served by id.
Searches run one at a time on the loaded model (a lock); requests queue.
"""

import contextlib
import os
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

from scvnet_jax.errors import InputError, ScvnetError

STATIC = ("app.js", "style.css")
MAX_UPLOAD_BYTES = 20 << 20


class Searcher:
    """The index and the model, loaded once; `search` is what POST /api/search does."""

    def __init__(self, index, model, *, batch_size: int = 0, bucket: int = 64,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, shortlist: int = 1000):
        self.index, self.model, self.shortlist = index, model, shortlist
        self.ids = {p: i for i, p in enumerate(index.paths)}   # hit path -> id, built once
        self.batch_size, self.bucket = batch_size, bucket
        self.max_upload_bytes = max_upload_bytes
        self.lock = threading.Lock()

    def search(self, *, data: bytes | None = None, filename: str = "upload", id=None,
               k: int = 10, rerank: str = "none", regions: int = 0, box=None) -> dict:
        from scvnet_jax.images import decode_image
        from scvnet_jax.rerank import registry

        t0 = time.perf_counter()
        if data is None and id is None:
            raise InputError("no query: the multipart field 'image' (the image file) is "
                             "missing; give it, or the id of an indexed image (query "
                             "parameter 'id')")
        if data is not None and id is not None:
            raise InputError("give an image (multipart field 'image') or the id of an "
                             "indexed image (query parameter 'id'), not both")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
            raise InputError(f"k must be an integer in [1, 1000], got {k!r}")
        if isinstance(regions, bool) or not isinstance(regions, int) or not 0 <= regions <= 20:
            raise InputError(f"regions must be an integer in [0, 20], got {regions!r}")
        if rerank != "none" and rerank not in registry.names():
            raise InputError(f"rerank must be none or one of {', '.join(registry.names())}, "
                             f"got {rerank!r}")
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
                           batch_size=self.batch_size, bucket=self.bucket,
                           shortlist=self.shortlist)
            with self.lock, _in_user_words(path, name):
                t1 = time.perf_counter()
                if regions or box is not None:
                    hits, found = self.index.search_regions(self.model, path, regions=regions,
                                                            box=box, **options)
                else:
                    hits, found = self.index.search(self.model, path, **options)[0], []
                t2 = time.perf_counter()
        out = {"query": shown(name), "rerank": rerank}
        if box is not None:
            out["box"] = list(box)
        if regions:
            out["regions"] = [list(r) for r in found]
        out["hits"] = [{"id": self.ids[h.path], "path": shown(h.path),
                        "score": round(h.score, 6)} for h in hits]
        out["timings"] = {"search_ms": round(1000 * (t2 - t1), 1),
                          "total_ms": round(1000 * (time.perf_counter() - t0), 1)}
        return out

    def path_of(self, id) -> str:
        if isinstance(id, bool) or not isinstance(id, int) or not 0 <= id < len(self.index):
            raise KeyError(id)
        return self.index.paths[id]


def shown(path: str) -> str:
    """`path` as text that can be printed and sent as JSON: bytes of a file name that are
    not UTF-8 (Linux allows any; Python holds them as lone surrogates) written as \\xNN."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        try:
            return os.fsencode(path).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:      # a surrogate that no file name gave
            return path.encode("utf-8", "backslashreplace").decode("utf-8")


@contextlib.contextmanager
def _in_user_words(path: str, name: str):
    """An error that names the upload's temporary copy (`path`) names the upload instead."""
    try:
        yield
    except ScvnetError as e:
        if path == name or path not in str(e):
            raise
        raise type(e)(str(e).replace(path, name)) from None


class _UploadLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 {"error": ...}
    while it arrives, from its Content-Length before any byte is read, else (chunked) once
    the bytes received pass the limit; Starlette never spools more than that to disk.
    `limit_mb` is the upload limit the message states (the body may hold a little more:
    the multipart headers)."""

    class TooLarge(Exception):
        pass

    def __init__(self, app, limit: int, limit_mb: float):
        self.app, self.limit, self.limit_mb = app, limit, limit_mb

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self.refuse(scope, send, f"the upload is {int(length) / 2**20:.1f} "
                                     f"MB, above the limit of {self.limit_mb:g} MB")
        seen, over, answered = 0, "", False

        async def counted():
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                over = (f"the upload is over the limit of {self.limit_mb:g} MB (refused "
                        f"after {seen / 2**20:.1f} MB)")
                raise self.TooLarge(over)
            return message

        async def sending(message):     # the app's answer to a cut body is replaced
            nonlocal answered
            if not over:
                return await send(message)
            if not answered:
                answered = True
                await self.refuse(scope, send, over)
        try:
            await self.app(scope, counted, sending)
        except self.TooLarge:
            if not answered:
                await self.refuse(scope, send, over)

    @staticmethod
    async def refuse(scope, send, message: str):
        from fastapi.responses import JSONResponse
        await JSONResponse({"error": message}, status_code=413,
                           headers={"Connection": "close"})(scope, None, send)


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
    from fastapi import FastAPI, File, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    from scvnet_jax.errors import ScvnetError
    from scvnet_jax.rerank import registry

    app = FastAPI(title="scvnet-search", description="Search an indexed photo collection "
                  "by image or region (scvnet_jax).", docs_url=None, redoc_url=None)
    app.add_middleware(_UploadLimit, limit=searcher.max_upload_bytes + (64 << 10),
                       limit_mb=round(searcher.max_upload_bytes / 2**20, 6))
    static = resources.files("scvnet_jax.app") / "static"

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):   # unknown routes too: the same shape
        raw = request.scope.get("raw_path") or request.url.path.encode()  # as sent
        where = f"{request.method} {raw.decode('latin-1')}"
        message = {404: f"no such page or API route: {where} (the API: /docs)",
                   405: f"method not allowed: {where} (allowed: "
                        f"{(e.headers or {}).get('Allow', '?')})"}.get(e.status_code, e.detail)
        return JSONResponse({"error": message}, status_code=e.status_code, headers=e.headers)

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
        return page_html(searcher, registry.names())

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str):
        if name not in STATIC:
            return JSONResponse({"error": f"no static file {name!r}"}, status_code=404)
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return Response((static / name).read_bytes(), media_type=kind)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs():
        return docs_html(app.openapi())

    @app.get("/api/health")
    def health():
        """The index's facts and the rerankers offered."""
        ix = searcher.index
        return {"status": "ok", "images": len(ix), "family": ix.family,
                "weights": ix.weights, "dtype": ix.descriptors.dtype.name,
                "backend": "exact" if ix.backend is None else
                f"{ix.backend.name} {getattr(ix.backend, 'kind', '')}".strip(),
                "recall_at_10": ix.recall_at_10,
                "rerankers": ["none", *registry.names()]}

    @app.post("/api/search")
    async def search(request: Request,
                     image: UploadFile | None = File(None, description="the query image"),
                     id: int | None = Query(None, description="search with indexed image id"),
                     k: int = Query(10, description="hits to return (1..1000)"),
                     rerank: str = Query("none", description="none or a registry reranker"),
                     regions: int = Query(0, description="regions of the query to search too"),
                     box: str | None = Query(None, description="x1,y1,x2,y2: search a crop")):
        """Top-k hits for an uploaded image (multipart field `image`) or an indexed one
        (`id`): [{"id", "path", "score"}], best first."""
        data = None
        if len((await request.form()).getlist("image")) > 1:
            raise InputError("several 'image' fields: send one image per search")
        if image is not None:
            data = await image.read(searcher.max_upload_bytes + 1)
        import anyio
        return await anyio.to_thread.run_sync(lambda: searcher.search(
            data=data, filename=(image.filename or "upload") if image else "upload", id=id,
            k=k, rerank=rerank, regions=regions, box=box))

    @app.get("/api/image/{id}")
    def image_file(id: int):
        """An indexed image, by its id."""
        try:
            path = searcher.path_of(id)
        except KeyError:
            return JSONResponse({"error": f"no indexed image with id {id}"}, status_code=404)
        if not os.path.isfile(path):
            return JSONResponse({"error": f"image {id} is no longer at {shown(path)}"},
                                status_code=404)
        return FileResponse(path)

    return app


def docs_html(schema: dict) -> str:
    """The API's documentation as one page made from its OpenAPI schema: every route with
    its parameters, body fields and answers; no script, no style from elsewhere."""
    from html import escape

    def fields(rows):
        return "".join(f"<tr><td><code>{escape(n)}</code></td><td>{escape(w)}</td><td>"
                       f"{escape(t)}</td><td>{escape(d)}</td></tr>" for n, w, t, d in rows)

    def kind(s):
        s = s.get("anyOf", [s])[0]
        return ("file" if s.get("format") == "binary" or "contentMediaType" in s
                else s.get("type", ""))
    parts = []
    for route, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            rows = [(q["name"], q["in"] + (", required" if q.get("required") else ""),
                     kind(q.get("schema", {})), q.get("description", ""))
                    for q in op.get("parameters", [])]
            for media in op.get("requestBody", {}).get("content", {}).values():
                ref = media.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1]
                body = schema.get("components", {}).get("schemas", {}).get(ref, {})
                rows += [(n, "multipart body", kind(f), f.get("description", ""))
                         for n, f in body.get("properties", {}).items()]
            answers = ", ".join(f"{c} {r.get('description', '')}"
                                for c, r in op.get("responses", {}).items())
            table = (f"<table><tr><th>name</th><th>where</th><th>type</th><th>what</th></tr>"
                     f"{fields(rows)}</table>" if rows else "")
            parts.append(f"<section><h2><code>{method.upper()} {escape(route)}</code></h2>"
                         f"<p>{escape(op.get('description') or op.get('summary', ''))}</p>"
                         f"{table}<p>Answers: {escape(answers)}; errors are 4xx "
                         f"<code>{{\"error\": \"...\"}}</code>.</p></section>")
    info = schema.get("info", {})
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(info.get('title', ''))} API</title>
<style>body{{font-family:sans-serif;max-width:60rem;margin:1rem auto;padding:0 1rem}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.2rem .5rem;
text-align:left}}</style></head>
<body><h1>{escape(info.get('title', ''))} API</h1><p>{escape(info.get('description', ''))}
The schema: <a href="/openapi.json">/openapi.json</a>; the page: <a href="/">/</a>.</p>
{"".join(parts)}
</body></html>
"""


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
