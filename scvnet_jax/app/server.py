"""`scvnet-search serve`: one index and its model, loaded once, behind a web page and a REST
API (FastAPI; every script and style is shipped in this package, nothing from a CDN).

    GET  /                 the page: drop or choose an image, draw a box, see the regions,
                           choose the reranker and k, see the hits; click one to search with it
    GET  /api/health       {"status": "ok", "images": N, "family": ..., "weights": ...}
    POST /api/search       multipart field `image` (or query parameter `id`: an indexed image),
                           query parameters k, rerank, rerank_k, regions, box=x1,y1,x2,y2
                           -> {"query", "rerank", "score_kind", ["box"], ["regions"], "hits":
                           [{"id", "path", "score"}], "missing": [paths of indexed files that
                           are gone, left out], "timings": {"search_ms", "total_ms"}}
                           (score_kind: what the scores are, on the reranker's own scale:
                           not probabilities)
    POST /api/explain      query parameter `hit` (an indexed image's id) and the query as for
                           /api/search (`image` or `id`, `box`), `method` (homography or
                           fundamental) -> {"query", "hit": {"id", "path"}, "method",
                           "threshold", "query_size", "hit_size", "correspondences",
                           "inliers", "pairs": [[qx, qy, hx, hy, cosine, inlier]], "ms"}:
                           why the hit matched (points in pixels of the upright files)
    GET  /api/image/{id}   an indexed image, by its id only (no paths: nothing else is
                           served), as the browser can show it: JPEG, PNG, WebP, GIF and BMP
                           files as they are, other formats (TIFF, ...) converted to JPEG
    GET  /api/original/{id}  the untouched file, as a download
    GET  /api/thumb/{id}   its thumbnail: upright JPEG, longest side 256 px (kept in memory,
                           at most 64 MB, least recently used dropped)
    GET  /docs             the API's documentation, a page made here from the OpenAPI
                           schema (GET /openapi.json): no script or style from elsewhere

Bad requests (not an image, corrupt or truncated, over the pixel limit, too large an upload,
an unknown reranker, k < 1, a bad box, an unknown route) get HTTP 4xx with {"error": "..."},
never a 500. An upload over the limit is refused while it arrives (413), from its
Content-Length before any byte is read, else once the bytes received pass the limit: it is
never spooled to disk in full. File names that are not UTF-8 (Linux allows any bytes) are
shown with \\xNN escapes for those bytes (`shown`); their images are still served by id.
Searches run on the loaded model in two lanes, each one search at a time (a lock): the
rerankers that read database images again (seconds per candidate) in one, every other
search in the other, so a plain search never waits behind such a rerank; at most two
searches are in memory at once. The rerankers offered are the registry's
(`scvnet_jax.rerank.registry`), as it is at each request; those that need weights of their
own only when the server was given them (`serve --<name>_weights`).
A Searcher given the index file's path notices when it is re-indexed (its size, mtime or
inode change) and loads it on the next request (the model stays): no restart needed.
"""

import contextlib
import hashlib
import hmac
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from http.cookies import SimpleCookie
from importlib import resources
from pathlib import Path
from urllib.parse import unquote

from scvnet_jax.errors import InputError, ScvnetError, StaleIdsError

STATIC = ("app.js", "style.css")
MAX_UPLOAD_BYTES = 20 << 20
THUMB_SIDE = 256                    # a thumbnail's longest side, pixels
THUMB_CACHE_BYTES = 64 << 20        # thumbnails kept in memory, at most
KEPT_VERSIONS = 16                  # the ids of the last re-indexed versions still answered
# formats every current browser shows, served as they are (PIL's names -> media type)
BROWSER_FORMATS = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png",
                   "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}
FIRST_STAGE_SCORE = "cosine similarity of the global descriptors, -1 to 1"
log = logging.getLogger("scvnet_jax.app")


def score_kind(rerank: str) -> str:
    """What a search's scores are, on the reranker's own scale (not probabilities)."""
    from scvnet_jax.rerank import registry
    if rerank == "none":
        return (f"{FIRST_STAGE_SCORE} (not a probability: unrelated photos can score "
                "0.9)")
    return (f"{rerank}: {registry.RERANKERS[rerank].score} (its own scale, not a "
            f"probability; hits it did not re-score keep the {FIRST_STAGE_SCORE})")


class Searcher:
    """The index and the model, loaded once; `search` is what POST /api/search does."""

    def __init__(self, index, model, *, batch_size: int = 0, bucket: int = 64,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, shortlist: int = 1000,
                 reranker_options: dict | None = None, index_path=None, load=None):
        """reranker_options: name -> options (e.g. {name: {"weights": path}}): a reranker
        that needs weights is offered only with them. index_path: the index file, reloaded
        when it changes on disk (by `load()`, default `Index.load(index_path)`); None: the
        index stays as given."""
        self.model, self.shortlist = model, shortlist
        self.reranker_options = {n: dict(o) for n, o in (reranker_options or {}).items()}
        self._versions: OrderedDict = OrderedDict()     # version -> paths: ids it gave out
        self._set(index)
        self.batch_size, self.bucket = batch_size, bucket
        self.max_upload_bytes = max_upload_bytes
        self.lock = threading.Lock()            # plain searches and light rerankers
        self.rerank_lock = threading.Lock()     # rerankers that read the database images
        self.index_path = index_path
        self._load = load
        self._signature = _file_signature(index_path)
        self._reload_lock = threading.Lock()
        self.thumbs = _LRU(THUMB_CACHE_BYTES)
        self._explained: dict = {}     # (query digest, box, working size) -> its locals
        self.watcher = None            # app.watch.Watcher: serve --watch

    @property
    def rerankers(self) -> list:
        """The registry's rerankers this server offers (those that need weights: given)."""
        from scvnet_jax.rerank import registry
        return [n for n in registry.names() if not registry.get(n).needs_weights
                or self.reranker_options.get(n, {}).get("weights")]

    def _set(self, index) -> None:
        """Serves `index` from now on: it, its ids and its version swapped at once (one
        tuple). Its ids stay answerable after the next KEPT_VERSIONS - 1 re-indexes, in
        bounded memory: the versions kept share their path strings, and the oldest go
        while they hold more than 4 paths per path of the served index (the one before
        it is always kept)."""
        version = index_version(index)
        paths = list(index.paths)
        if self._versions:                       # one string per path, shared by versions
            canon = {p: p for p in next(reversed(self._versions.values()))}
            paths = [canon.get(p, p) for p in paths]
        self._versions[version] = paths
        self._versions.move_to_end(version)
        while len(self._versions) > 2 and (
                len(self._versions) > KEPT_VERSIONS or
                sum(map(len, self._versions.values())) > 4 * len(paths) + 1000):
            self._versions.popitem(last=False)
        self._state = (index, {p: i for i, p in enumerate(paths)}, version)

    @property
    def index(self):
        return self._state[0]

    @property
    def version(self) -> str:
        """The served index's version: ids are valid with it (`index_version`)."""
        return self.snapshot()[2]

    @property
    def ids(self):       # hit path -> id
        return self._state[1]

    def current(self):
        """(index, ids) for one request (`snapshot` without the version)."""
        return self.snapshot()[:2]

    def snapshot(self):
        """(index, ids, version) for one request: first the index file reloaded if it
        changed on disk since it was read (one reader loads it, then all three are swapped
        at once; a file that cannot be read, or that was built with another model, leaves
        the index in use as it is, said in the log)."""
        if self.index_path is None:
            return self._state
        signature = _file_signature(self.index_path)
        if signature is None or signature == self._signature:
            return self._state
        with self._reload_lock:
            if signature == self._signature:           # another request loaded it
                return self._state
            self._signature = signature
            try:
                if self._load is not None:
                    index = self._load()
                else:
                    from scvnet_jax.search import Index
                    index = Index.load(self.index_path)
            except InputError as e:
                log.warning("%s changed but cannot be read; still searching the index "
                            "loaded before: %s", self.index_path, e)
                return self._state
            if self.index.model and index.model != self.index.model:
                log.warning("%s was re-indexed with another model (%s) than the server "
                            "runs; still searching the index loaded before (restart the "
                            "server to use the new one)", self.index_path, index.weights)
                return self._state
            self._set(index)
            log.warning("%s changed: reloaded, %d images", self.index_path, len(index))
            return self._state

    def search(self, *, data: bytes | None = None, filename: str = "upload", id=None,
               k: int = 10, rerank: str = "none", regions: int = 0, box=None,
               rerank_k: int = 100, v: str | None = None) -> dict:
        """POST /api/search. `id`: an indexed image's, of the index version `v` (what the
        search that gave it answered as "version"; default the served one)."""
        from scvnet_jax.rerank import registry

        t0 = time.perf_counter()
        index, ids, version = self.snapshot()   # this request's, even if a re-index lands
        _check_query(data, id)
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
            flag = registry.get(rerank).option("weights").flag or "option weights="
            raise InputError(f"rerank {rerank} needs weights, and this server has none for "
                             f"it: start it with --{flag} MODEL")
        box = parse_box(box) if isinstance(box, str) else box
        with tempfile.TemporaryDirectory(prefix="scvnet-query-") as tmp:
            path, name = self._query_file(tmp, index, data, filename, id, v)
            options = dict(k=k, rerank=None if rerank == "none" else rerank,
                           rerank_k=rerank_k, options=self.reranker_options.get(rerank),
                           batch_size=self.batch_size, bucket=self.bucket,
                           shortlist=self.shortlist)
            slow = rerank != "none" and registry.get(rerank).needs_images
            with self.rerank_lock if slow else self.lock, _in_user_words(path, name):
                t1 = time.perf_counter()
                if regions or box is not None:
                    hits, found = index.search_regions(self.model, path, regions=regions,
                                                       box=box, **options)
                else:
                    hits, found = index.search(self.model, path, **options)[0], []
                t2 = time.perf_counter()
        out = {"query": shown(name), "rerank": rerank, "score_kind": score_kind(rerank)}
        if box is not None:
            out["box"] = list(box)
        if regions:
            out["regions"] = [list(r) for r in found]
        out["hits"] = [{"id": ids[h.path], "path": shown(h.path),
                        "score": round(h.score, 6)} for h in hits]
        out["missing"] = [shown(p) for p in getattr(hits, "missing", ())]
        out["version"] = version      # the hits' ids are of this index (give it back as v)
        if id is not None and path in ids:          # the query's own id in it
            out["query_id"] = ids[path]
        out["timings"] = {"search_ms": round(1000 * (t2 - t1), 1),
                          "total_ms": round(1000 * (time.perf_counter() - t0), 1)}
        return out

    def _query_file(self, tmp: str, index, data: bytes | None, filename: str, id, v=None):
        """(path, name) of a request's query: the indexed image `id` (of version `v`), or
        the upload `data` (checked: size, then decodable) written into `tmp`."""
        from scvnet_jax.images import decode_image
        _check_query(data, id)
        if id is not None:
            path = self._indexed(id, index, v, "id")
            return path, path
        if len(data) > self.max_upload_bytes:
            raise InputError(f"{filename}: the upload is {len(data) / 2**20:.1f} MB, "
                             f"above the limit of {self.max_upload_bytes / 2**20:g} MB")
        decode_image(data, filename)            # refused here, before any work
        path = os.path.join(tmp, "query" + (Path(filename).suffix.lower()[:6] or ".jpg"))
        Path(path).write_bytes(data)
        return path, filename

    def explain(self, *, hit, data: bytes | None = None, filename: str = "upload", id=None,
                box=None, method: str = "homography", v: str | None = None) -> dict:
        """Why indexed image `hit` matches the query (an upload `data` or indexed image
        `id`, cropped to `box`): the mutual nearest neighbours of their local descriptors
        and which one geometry keeps (`rerank.spatial`), in pixels of the upright files at
        full size. The query's descriptors are kept for the next hits (the last 8 queries,
        by content and box); the hit's in the content-keyed store (as the spatial
        reranker's). `hit` and `id` are ids of the index version `v` (default: the served
        one)."""
        from scvnet_jax import images
        from scvnet_jax.rerank import spatial

        t0 = time.perf_counter()
        index = self.current()[0]
        if method not in spatial.METHODS:
            raise InputError(f"method must be one of {', '.join(spatial.METHODS)}, got "
                             f"{method!r}")
        hit_path = self._indexed(hit, index, v, "hit")
        if not os.path.isfile(hit_path):
            raise InputError(f"hit {hit}: the image is no longer at {shown(hit_path)}")
        box = parse_box(box) if isinstance(box, str) else box
        with tempfile.TemporaryDirectory(prefix="scvnet-query-") as tmp:
            path, name = self._query_file(tmp, index, data, filename, id, v)
            key = (images.content_digest(path), None if box is None else tuple(box),
                   images.max_side())
            with self.rerank_lock, _in_user_words(path, name):
                feats = self._explained.get(key)
                if feats is None:
                    feats = spatial.query_locals(self.model, images.ImageRef(path, box),
                                                 bucket=self.bucket)
                    self._explained[key] = feats
                    while len(self._explained) > 8:
                        self._explained.pop(next(iter(self._explained)))
                c = spatial.explain_images(self.model, path, hit_path, box=box,
                                           method=method, cache_dir=_cache_dir(),
                                           query_features=feats)
        return {"query": shown(name), "hit": {"id": hit, "path": shown(hit_path)},
                **({"box": list(box)} if box is not None else {}), **c.as_dict(),
                "ms": round(1000 * (time.perf_counter() - t0), 1)}

    def _indexed(self, id, index, version, name: str) -> str:
        """`path_of` for a request's parameter `name`: an unknown id is an InputError."""
        try:
            return self.path_of(id, index, version)
        except KeyError:
            raise InputError(f"{name} {id!r}: no indexed image with this id (0 to "
                             f"{len(index) - 1})") from None

    def path_of(self, id, index=None, version=None) -> str:
        """The file of indexed image `id`: in the served index (or `index`), or in the
        version `version` of it that gave the id out (StaleIdsError when it is no longer
        kept); KeyError for an id it does not have."""
        if version is None:
            paths = (self.current()[0] if index is None else index).paths
        else:
            paths = self._versions.get(version)
            if paths is None:
                raise StaleIdsError(
                    f"version {version}: the collection was re-indexed since the search that "
                    f"gave this id, and the server no longer keeps its ids (it keeps the last "
                    f"{KEPT_VERSIONS}): search again")
        if isinstance(id, bool) or not isinstance(id, int) or not 0 <= id < len(paths):
            raise KeyError(id)
        return paths[id]

    def thumbnail(self, path: str) -> tuple[bytes, str]:
        """(JPEG bytes, ETag) of an image's thumbnail: upright (as `read_image` decodes
        it), longest side THUMB_SIDE, never enlarged. Kept in memory by the file's path,
        size, mtime and inode (a changed file gets a new one without reading it twice)."""
        import cv2

        from scvnet_jax.images import read_image
        try:
            st = os.stat(path)
        except OSError as e:
            raise InputError(f"{path}: cannot read the image file "
                             f"({e.strerror or e})") from None
        key = (path, st.st_size, st.st_mtime_ns, st.st_ino)
        etag = '"' + hashlib.blake2b(repr(key).encode("utf-8", "surrogateescape"),
                                     digest_size=12).hexdigest() + '"'
        data = self.thumbs.get(key)
        if data is None:
            im = read_image(path)
            h, w = im.shape[:2]
            scale = THUMB_SIDE / max(h, w)
            if scale < 1:
                im = cv2.resize(im, (max(1, round(w * scale)), max(1, round(h * scale))),
                                interpolation=cv2.INTER_AREA)
            ok, enc = cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 85])
            data = enc.tobytes()
            self.thumbs.put(key, data)
        return data, etag


class _LRU:
    """bytes values, at most `max_bytes` in all, the least recently used dropped first."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.size = max_bytes, 0
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key, value: bytes) -> None:
        with self.lock:
            if key in self.items:
                self.size -= len(self.items.pop(key))
            self.items[key] = value
            self.size += len(value)
            while self.size > self.max_bytes and len(self.items) > 1:
                self.size -= len(self.items.popitem(last=False)[1])


def index_version(index) -> str:
    """A short name for an index's ids (12 hex digits of a hash of its paths in order): a
    re-index that keeps every path where it was keeps the name, so ids given out stay
    right; one that moves them gets another."""
    h = hashlib.sha256()
    for p in index.paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:12]


def _version_param():
    """The query parameter `v` of the routes that take an id: the index version it is of."""
    from fastapi import Query
    return Query(None, description="the index version the id came from (a search's "
                 "\"version\"): right after a re-index too")


def _check_query(data, id) -> None:
    """One query: an upload or an indexed image's id."""
    if data is None and id is None:
        raise InputError("no query: the multipart field 'image' (the image file) is "
                         "missing; give it, or the id of an indexed image (query "
                         "parameter 'id')")
    if data is not None and id is not None:
        raise InputError("give an image (multipart field 'image') or the id of an "
                         "indexed image (query parameter 'id'), not both")


def _cache_dir() -> str:
    """Where per-image values are kept between requests (the search module's)."""
    from scvnet_jax.search import _token_cache
    return _token_cache()


def _file_signature(path):
    """(size, mtime, inode) of a file, None if it is not there now."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def browser_type(path: str) -> str | None:
    """The media type of an image file browsers show as it is, None for one to convert
    (TIFF, ...): from the file's header, not its name."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            fmt = im.format
    except Exception:         # not an image PIL knows: decoding says what is wrong
        fmt = None
    return BROWSER_FORMATS.get(fmt)


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


def duplicates_json(index, groups, threshold: float, k: int) -> dict:
    """The JSON of `Index.duplicates`'s groups, as `duplicates --json` and GET
    /api/duplicates give it."""
    return {"images": len(index), "threshold": threshold, "k": k,
            "groups": [g.as_dict(shown) for g in groups]}


TOKEN_COOKIE = "scvnet_token"
# what anyone may fetch without the token: the page's shell (no facts of the collection when a
# token is set), its script and style, and the API's description
PUBLIC_PATHS = ("/", "/docs", "/openapi.json")
PUBLIC_PREFIXES = ("/static/",)


class _TokenGuard:
    """ASGI middleware: with a token set, every request but the public ones (PUBLIC_PATHS,
    PUBLIC_PREFIXES) carries it, as `Authorization: Bearer <token>` (API clients) or the
    `scvnet_token` cookie (the page sets it when the user types the token in), or is
    answered 401 {"error": ...}. Compared in constant time."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    def _given(self, headers) -> bytes | None:
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            return auth[7:].strip()
        jar = SimpleCookie()
        try:
            jar.load(headers.get(b"cookie", b"").decode("latin-1"))
        except Exception:       # a malformed cookie header: no token
            return None
        morsel = jar.get(TOKEN_COOKIE)
        if morsel is None:
            return None
        return unquote(morsel.value).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return await self.app(scope, receive, send)
        given = self._given(dict(scope["headers"]))
        if given is not None and hmac.compare_digest(given, self.token):
            return await self.app(scope, receive, send)
        said = "a wrong token" if given is not None else "no token"
        body = json.dumps({"error": f"{said}: this server needs its token, as "
                           "'Authorization: Bearer <token>' (the page asks for it)"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"www-authenticate", b'Bearer realm="scvnet-search"'),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


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


def create_app(searcher: Searcher, token: str | None = None):
    """The FastAPI application over `searcher`. With `token`, every request but the page's
    shell, its static files and the API docs needs it (`_TokenGuard`)."""
    from fastapi import FastAPI, File, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    from scvnet_jax.errors import ScvnetError

    app = FastAPI(title="scvnet-search", description="Search an indexed photo collection "
                  "by image or region (scvnet_jax).", docs_url=None, redoc_url=None)
    app.add_middleware(_UploadLimit, limit=searcher.max_upload_bytes + (64 << 10),
                       limit_mb=round(searcher.max_upload_bytes / 2**20, 6))
    if token:
        app.add_middleware(_TokenGuard, token=token)
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
        return JSONResponse({"error": str(e)},
                            status_code=409 if isinstance(e, StaleIdsError) else 400)

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
        return page_html(searcher, searcher.rerankers, facts=not token)

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
        ix, _, version = searcher.snapshot()
        return {"status": "ok", "images": len(ix), "version": version, "family": ix.family,
                "weights": ix.weights, "dtype": ix.descriptors.dtype.name,
                "backend": "exact" if ix.backend is None else
                f"{ix.backend.name} {getattr(ix.backend, 'kind', '')}".strip(),
                "recall_at_10": ix.recall_at_10,
                # the working size its images (and queries) are read at; 0: full size
                "max_side": int(ix.max_side),
                "rerankers": ["none", *searcher.rerankers],
                # serve --watch: the folder followed, updates done, one pending or running,
                # the last one's counts, the files it skipped, why the last one failed
                **({"watch": searcher.watcher.status()} if searcher.watcher else {})}

    dupes: dict = {}       # (index object, threshold, k) -> the answer: the last few

    @app.get("/api/duplicates")
    def duplicates(threshold: float = Query(..., description="the cosine similarity that "
                                            "links two photos, in [-1, 1]"),
                   k: int = Query(10, description="neighbours looked at per photo (1..100)")):
        """Groups of near-identical photos (`scvnet-search duplicates`): largest first."""
        if not 1 <= k <= 100:
            raise ScvnetError(f"k: expected 1..100, got {k}")
        ix, _, version = searcher.snapshot()
        key = (id(ix), float(threshold), k)
        if key not in dupes or dupes[key][0] is not ix:    # (kept with it: ids are reused)
            t0 = time.perf_counter()
            groups = ix.duplicates(threshold, k=k)
            dupes[key] = (ix, {**duplicates_json(ix, groups, threshold, k), "version": version,
                               "ms": round(1000 * (time.perf_counter() - t0), 1)})
            while len(dupes) > 4:
                dupes.pop(next(iter(dupes)))
        return dupes[key][1]

    async def upload(request: Request, image, one: str) -> tuple:
        """(bytes or None, file name) of a request's query upload: one `image` field, read
        up to one byte past the limit (the search says it is too large)."""
        if len((await request.form()).getlist("image")) > 1:
            raise InputError(f"several 'image' fields: send {one}")
        if image is None:
            return None, "upload"
        return await image.read(searcher.max_upload_bytes + 1), image.filename or "upload"

    @app.post("/api/search")
    async def search(request: Request,
                     image: UploadFile | None = File(None, description="the query image"),
                     id: int | None = Query(None, description="search with indexed image id"),
                     k: int = Query(10, description="hits to return (1..1000)"),
                     rerank: str = Query("none", description="none or a registry reranker"),
                     rerank_k: int = Query(100, description="candidates a reranker with a "
                                           "depth re-orders (1..1000)"),
                     regions: int = Query(0, description="regions of the query to search too"),
                     box: str | None = Query(None, description="x1,y1,x2,y2: search a crop"),
                     v: str | None = _version_param()):
        """Top-k hits for an uploaded image (multipart field `image`) or an indexed one
        (`id`): [{"id", "path", "score"}], best first."""
        data, filename = await upload(request, image, "one image per search")
        import anyio
        return await anyio.to_thread.run_sync(lambda: searcher.search(
            data=data, filename=filename, id=id, k=k, rerank=rerank, regions=regions,
            box=box, rerank_k=rerank_k, v=v))

    @app.post("/api/explain")
    async def explain(request: Request,
                      hit: int = Query(..., description="the indexed image to explain"),
                      image: UploadFile | None = File(None, description="the query image"),
                      id: int | None = Query(None, description="or an indexed query's id"),
                      box: str | None = Query(None, description="x1,y1,x2,y2: the query's "
                                              "crop"),
                      method: str = Query("homography", description="homography or "
                                          "fundamental"),
                      v: str | None = _version_param()):
        """Why hit `hit` matched the query (an upload, multipart field `image`, or the
        indexed image `id`): the mutual nearest neighbours of their local descriptors,
        [qx, qy, hx, hy, cosine, inlier] in pixels of the upright files at full size, and
        the inliers of one robust geometric fit."""
        data, filename = await upload(request, image, "one query image")
        import anyio
        return await anyio.to_thread.run_sync(lambda: searcher.explain(
            hit=hit, data=data, filename=filename, id=id, box=box, method=method, v=v))

    def indexed_file(id: int, v: str | None = None):
        """(the file of indexed image `id` (of index version `v`), None) or (None, the 404
        to answer)."""
        try:
            path = searcher.path_of(id, version=v)
        except KeyError:
            return None, JSONResponse({"error": f"no indexed image with id {id}"},
                                      status_code=404)
        if not os.path.isfile(path):
            return None, JSONResponse({"error": f"image {id} is no longer at {shown(path)}"},
                                      status_code=404)
        return path, None

    @app.get("/api/image/{id}")
    def image_file(id: int, v: str | None = _version_param()):
        """An indexed image, by its id, in a format the browser shows."""
        path, missing = indexed_file(id, v)
        if missing:
            return missing
        kind = browser_type(path)
        if kind is not None:
            return FileResponse(path, media_type=kind)
        import cv2

        from scvnet_jax.images import read_image
        ok, enc = cv2.imencode(".jpg", read_image(path), [cv2.IMWRITE_JPEG_QUALITY, 92])
        return Response(enc.tobytes(), media_type="image/jpeg")

    @app.get("/api/original/{id}")
    def original_file(id: int, v: str | None = _version_param()):
        """An indexed image's untouched file, as a download."""
        path, missing = indexed_file(id, v)
        if missing:
            return missing
        name = os.path.basename(path).encode("utf-8", "surrogateescape").decode(
            "utf-8", "replace")
        return FileResponse(path, filename=name)

    @app.get("/api/thumb/{id}")
    def thumb_file(id: int, request: Request, v: str | None = _version_param()):
        """An indexed image's thumbnail (upright JPEG, longest side 256 px)."""
        path, missing = indexed_file(id, v)
        if missing:
            return missing
        data, etag = searcher.thumbnail(path)
        headers = {"ETag": etag, "Cache-Control": "no-cache"}   # ids change on re-index
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

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


def page_html(searcher: Searcher, rerankers, facts: bool = True) -> str:
    """The page, rendered on the server (the index's facts and the reranker list). Without
    `facts` (a server with a token: the page is public) the facts are left to the script,
    which reads them from /api/health once the token is given."""
    from html import escape
    ix = searcher.current()[0]
    from scvnet_jax.rerank import registry
    facts_html = (f"{len(ix)} images &middot; {escape(ix.family)} descriptors &middot;\n"
                  f"model {escape(ix.weights or 'unknown')}") if facts else "&hellip;"
    opts = "".join(f'<option value="{escape(n)}">{escape(n)}</option>'
                   for n in ["none", *rerankers])
    depth = ", ".join(n for n in rerankers if registry.get(n).depth and
                      registry.get(n).depth_from_rerank_k)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>scvnet-search</title><link rel="stylesheet" href="/static/style.css"></head>
<body>
<header><h1>scvnet-search</h1>
<p><span id="facts">{facts_html}</span> &middot; <a href="/docs">API</a></p></header>
<form id="tokenform" hidden><label>This server needs its token:
  <input id="token" type="password" autocomplete="current-password" required></label>
  <button type="submit">Go</button> <span id="tokenstatus" role="status"></span></form>
<main>
<section id="query">
  <div id="drop" tabindex="0">Drop an image here or
    <label class="button">choose a file<input id="file" type="file" accept="image/*"></label>
  </div>
  <div id="stage" hidden><canvas id="canvas"></canvas>
    <p class="hint">Drag on the image to search a region; <button id="clearbox"
    type="button">clear box</button></p></div>
  <form id="controls" novalidate>
    <label>reranker <select id="rerank" name="rerank">{opts}</select></label>
    <label title="how many of the first stage's best the reranker re-scores (those with a
depth: {escape(depth)})">rerank k <input id="rerank_k" name="rerank_k" type="number" min="1" max="1000"
      value="100" disabled></label>
    <label>k <input id="k" name="k" type="number" min="1" max="1000" value="10"></label>
    <label>regions <input id="regions" name="regions" type="number" min="0" max="20"
      value="0"></label>
    <button id="search" type="submit" disabled>Search</button>
  </form>
  <p id="status" role="status"></p>
</section>
<section id="results"><p id="scorekind"></p><div id="grid"></div></section>
</main>
<section id="dupes"><h2>Duplicates</h2>
  <form id="dupform" novalidate><label title="the cosine similarity of two photos' global
descriptors that links them; it depends on the model (docs: The search app, Duplicates)">similarity
    at least <input id="dup_threshold" type="number" min="-1" max="1" step="0.001"
    value="0.995"></label> <button id="dupsearch" type="submit">Find duplicates</button></form>
  <p id="dupstatus" role="status"></p><div id="dupgroups"></div></section>
<div id="viewer" role="dialog" aria-modal="true" aria-label="image viewer" hidden>
  <div id="viewer-bar">
    <span id="viewer-path"></span>
    <span id="viewer-score"></span>
    <a id="viewer-original" class="button" href="#" download>original</a>
    <button id="viewer-search" type="button">search with this</button>
    <button id="viewer-toggle" type="button" hidden>photo only</button>
    <button id="viewer-close" type="button" aria-label="close (Esc)">close &times;</button>
  </div>
  <p id="viewer-why" role="status"></p>
  <img id="viewer-image" alt="">
  <canvas id="viewer-match" hidden></canvas>
</div>
<script src="/static/app.js"></script>
</body></html>
"""
