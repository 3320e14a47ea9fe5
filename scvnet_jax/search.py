"""Search your own image collection: index a folder, query it, look at the results.

    import scvnet_jax as sj
    model = sj.load("CVPR2022_CVNet_R50.pyth")           # or sj.demo_model_path()
    index = sj.search.index_folder(model, "photos/")     # descriptors of every image
    index.save("photos.index.npz")                       # reload with sj.search.Index.load
    index, stats = sj.search.update_index(model, "photos/", "photos.index.npz")
                                     # incremental: only new or changed files are extracted
    hits = index.search(model, ["query.jpg"], k=10)     # [[Hit(path, score), ...]]
    grid = sj.search.result_grid("query.jpg", hits[0])   # BGR uint8 image of the top hits

Descriptors are extracted and searched by the same engine as eval.py (`scvnet_jax.engine`;
`family="cvnet"`: CVNet-Global over three OpenCV scales; `"superglobal"`: the SuperGlobal
descriptor), with the same size buckets, threads, devices and progress bar.
`search(..., rerank=NAME)` refines the ranking with any reranker of the registry
(`scvnet_jax.rerank.registry.names()`, with their defaults; protocols "blind": no labels
here); `options` sets the reranker's options (e.g. {"weights": ...} for one that needs
weights), `rerank_k` the depth of the ones that re-score the top hits. Rerankers that
read local descriptors keep the database's in the package's cache folder, by content.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from scvnet_jax import files, mesh
from scvnet_jax import images as image_io
from scvnet_jax.api import RetrievalModel
from scvnet_jax.engine import backends, extract, ondisk
from scvnet_jax.engine.cache import BACKBONE, content_digests, weights_fingerprint
from scvnet_jax.engine.search import rank
from scvnet_jax.errors import InputError, OutputError
from scvnet_jax.evaluation import visuals
from scvnet_jax.images import IMAGE_EXTENSIONS, ImageRef, read_image
from scvnet_jax.rerank import registry

FAMILIES = tuple(extract.FAMILIES)
FORMAT = "scvnet_jax.search.index/2"
FORMATS = ("scvnet_jax.search.index/1", FORMAT)     # /1: no digests, model key or weights
FOLDER_FORMAT = "scvnet_jax.search.index-folder/1"   # Index.save_folder: larger than memory
RAY_MANIFEST = "ray_manifest.json"   # in <index>.parts/: a Ray job's chunks so far
DTYPES = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class Hit:
    path: str
    score: float


class Hits(list):
    """One query's hits (Hit), best first; `missing`: the indexed files that ranked among
    them, or among the candidates a reranker reads, but no longer exist (left out)."""
    missing: tuple = ()

    def __init__(self, hits=(), missing=()):
        super().__init__(hits)
        self.missing = tuple(missing)


def list_images(folder) -> list[Path]:
    """Every image file under `folder` (recursive, sorted), or one clear error."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                   and p.is_file())
    if not paths:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it")
    return paths


def describe(model: RetrievalModel, images: Sequence, family: str = "cvnet", *,
             batch_size: int = 0, bucket: int = 64, workers: int = 4,
             desc: str = "describe", scales=None, progress: bool = True) -> np.ndarray:
    """Descriptors (N, D), L2-normalised, of image files (paths, or ImageRefs with boxes).
    scales: None (the family's own: three for both), or the family's `scales` option (a
    tuple of factors for cvnet, 1/3/5 or factors for superglobal)."""
    refs = [p if isinstance(p, ImageRef) else ImageRef(str(p)) for p in images]
    scales = _scales(family, scales)
    spec = extract.spec_of(family, **({} if scales is None else {"scales": scales}))
    return extract.extract(model, refs, spec, batch_size=batch_size, bucket=bucket,
                           workers=workers, desc=desc, progress=progress)


# Proposed regions are described at one scale (the whole query at the family's three):
# a 6-crop query costs the whole image's three passes plus five one-scale crops instead of
# fifteen, which brings it under a second with the demo model on 2 CPU cores (README,
# "Visual search": speed, and what it does to the results).
REGION_SCALES = {"cvnet": (1.0,), "superglobal": 1}


@dataclasses.dataclass
class DuplicateGroup:
    """Near-identical images (`Index.duplicates`): their ids and paths, each one's best
    similarity to another member (`best`), the lowest similarity among the links that join
    the group (`weakest_link`), and whether every file has the same content (`identical`)."""
    ids: list
    paths: list
    best: list
    weakest_link: float
    identical: bool

    def as_dict(self, shown=str) -> dict:
        """JSON-ready; `shown` turns each path into the text to show."""
        return {"images": [{"id": int(i), "path": shown(p), "best": round(b, 6)}
                           for i, p, b in zip(self.ids, self.paths, self.best)],
                "weakest_link": round(self.weakest_link, 6), "identical": self.identical}


@dataclasses.dataclass
class Index:
    """Descriptors of a collection: `paths[i]` (absolute) has `descriptors[i]` (float32, or
    float16 to halve the size); `root` is the folder that was indexed (`rerooted` moves the
    paths to where the collection is now); `skipped` lists (path, reason) of files left out
    by `on_error="skip"`. Written by `update_index`, an index also records each file's
    content digest (`digests`), what its descriptors depend on (`model`: a key of the
    backbone's weights, the descriptor settings, the dtype and the working size) and the
    `weights` it was built with ("demo" or a path), so a rerun extracts only new or changed
    files. `max_side`: the working size its images were read at (`images.set_max_side`;
    0 = full size, as indexes from before it was recorded)."""
    paths: list[str]
    descriptors: np.ndarray
    family: str = "cvnet"
    root: str = ""
    skipped: list = dataclasses.field(default_factory=list)
    digests: list = dataclasses.field(default_factory=list)
    model: str = ""
    weights: str = ""
    backend: object = None      # engine.backends.*: None = exact search on the device
    recall_at_10: float | None = None   # of a faiss backend against exact search
    max_side: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    def save(self, path) -> Path:
        """One .npz (no pickle), written atomically."""
        path = Path(path)
        if isinstance(self.descriptors, ondisk.Rows):
            raise InputError(f"{path}: an index folder is not saved again as one file "
                             "(it may not fit in memory); it is written by save_folder")
        d = self.descriptors
        d = d if d.dtype == np.float16 else d.astype(np.float32)
        skipped = np.array([f"{p}\t{r}" for p, r in self.skipped], dtype=str)
        extra = {}
        if getattr(self.backend, "name", "exact") == "faiss":   # inside: never out of step
            extra = {"faiss_index": self.backend.serialize(),
                     "recall_at_10": np.array(self.recall_at_10 if self.recall_at_10
                                              is not None else np.nan)}
        files.atomic_save_npz(path, format=np.array(FORMAT), family=np.array(self.family),
                              root=np.array(self.root), paths=np.array(self.paths, dtype=str),
                              descriptors=d, digests=np.array(self.digests, dtype=str),
                              model=np.array(self.model), weights=np.array(self.weights),
                              max_side=np.array(self.max_side), skipped=skipped, **extra)
        return path

    @classmethod
    def load(cls, path, root=None) -> "Index":
        """An index saved by `save`; `root`: where the indexed folder is now (see `rerooted`).
        A missing, damaged or foreign file is one InputError naming it. A folder is an
        index written by `save_folder` (`scvnet-search convert`): opened, not read."""
        if Path(path).is_dir():
            index = cls._open_folder(Path(path))
            return index.rerooted(root) if root is not None else index
        if not Path(path).is_file():
            raise InputError(f"{path}: no such index file")
        try:                                # a text file, an image...: no numpy hint
            with open(path, "rb") as f:
                zipped = f.read(4) == b"PK\x03\x04"
        except OSError as e:
            raise InputError(f"{path}: cannot read the search index ({e.strerror})") from None
        if not zipped:
            raise InputError(f"{path}: cannot read the search index: not an index file "
                             "(expected the .npz file that `scvnet-search index` writes)")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format" not in z.files or str(z["format"]) not in FORMATS:
                    raise InputError(f"{path}: not a scvnet_jax search index (expected a "
                                     f"file written by Index.save, format {FORMAT})")
                get = (lambda k, default="": str(z[k]) if k in z.files else default)
                index = cls([str(p) for p in z["paths"]], np.asarray(z["descriptors"]),
                            get("family", "cvnet"), get("root"),
                            [tuple(str(v).split("\t", 1)) for v in z["skipped"]]
                            if "skipped" in z.files else [],
                            [str(v) for v in z["digests"]] if "digests" in z.files else [],
                            get("model"), get("weights"))
                index.max_side = int(z["max_side"]) if "max_side" in z.files else 0
                faiss_bytes = z["faiss_index"] if "faiss_index" in z.files else None
                if faiss_bytes is not None:
                    r = float(z["recall_at_10"])
                    index.recall_at_10 = None if np.isnan(r) else r
        except InputError:
            raise
        except Exception as e:   # zip, npy and OS errors of a damaged file alike
            raise InputError(f"{path}: cannot read the search index, the file is damaged or "
                             f"not an index ({type(e).__name__}: {e})") from None
        if (index.descriptors.ndim != 2 or index.descriptors.shape[0] != len(index.paths)
                or index.descriptors.dtype.name not in DTYPES
                or index.digests and len(index.digests) != len(index.paths)):
            raise InputError(f"{path}: damaged search index ({len(index.paths)} paths, "
                             f"{len(index.digests)} digests, descriptors "
                             f"{index.descriptors.dtype} of shape {index.descriptors.shape})")
        if faiss_bytes is not None:
            index.backend = backends.Faiss.deserialize(faiss_bytes, index.descriptors.shape,
                                                       what=str(path))
        return index.rerooted(root) if root is not None else index

    @classmethod
    def _open_folder(cls, folder: Path) -> "Index":
        m = ondisk.read_manifest(folder, FOLDER_FORMAT)
        try:
            n, dim = int(m["n"]), int(m["dim"])
            shards = [(folder / ondisk.SHARD_DIR / str(f), int(r)) for f, r in m["shards"]]
            layout, skipped = dict(m["layout"]), [tuple(map(str, s)) for s in m["skipped"]]
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{folder / 'manifest.json'}: damaged ({type(e).__name__}: "
                             f"{e})") from None
        rows = ondisk.Rows([f for f, _ in shards], [r for _, r in shards], dim)
        if len(rows) != n:
            raise InputError(f"{folder / 'manifest.json'}: {n} vectors recorded, the shards "
                             f"hold {len(rows)}; rebuild the index")
        paths = ondisk.Strings(folder, "paths", n)
        digests = ondisk.Strings(folder, "digests", n) if m.get("digests") else []
        index = cls(paths, rows, str(m.get("family", "cvnet")), str(m.get("root", "")),
                    skipped, digests, str(m.get("model", "")), str(m.get("weights", "")),
                    max_side=int(m.get("max_side", 0)))
        index.backend = ondisk.DiskIVFPQ.open(folder, layout, n, dim)
        index.recall_at_10 = m.get("recall_at_10")
        return index

    def save_folder(self, folder, *, layout: dict | None = None,
                    shard_rows: int = ondisk.SHARD_ROWS, progress: bool = False) -> Path:
        """Writes this index as a folder that is opened, not loaded (`Index.load(folder)`):
        float16 descriptors in memory-mapped shards, the paths and digests on disk, and an
        IVF-PQ faiss index over them with its lists on disk (`engine.ondisk`: trained on a
        sample, filled shard by shard; `layout` overrides its settings). Searches take each
        query's top `shortlist` from it and re-score them exactly from the stored vectors.
        Its recall@10 against exact search is measured on 200 of its own vectors. Built in
        a hidden sibling and moved into place at the end; an existing `folder` is replaced
        only if it is an index folder."""
        folder = Path(folder).expanduser().absolute()
        if folder.exists() and not (folder.is_dir() and (folder / "manifest.json").is_file()):
            raise InputError(f"{folder}: exists and is not an index folder; name a new one")
        if folder.is_dir():
            ondisk.read_manifest(folder, FOLDER_FORMAT)      # ours to replace
        if len(self) == 0:
            raise InputError("an empty index is not written as a folder")
        try:
            tmp = files.staging_dir(folder)
        except OSError as e:
            raise OutputError(f"{folder}: cannot write the index folder there "
                              f"({e.strerror or e})") from None
        try:
            writer = ondisk.ShardWriter(tmp, self.descriptors.shape[1], shard_rows)
            for a in range(0, len(self), shard_rows):
                writer.add(np.asarray(self.descriptors[a:a + shard_rows]))
            rows = writer.finish()
            ondisk.Strings.write(tmp, "paths", self.paths)
            if self.digests:
                ondisk.Strings.write(tmp, "digests", self.digests)
            backend = ondisk.build_ivfpq(rows, tmp, layout=layout, progress=progress)
            sample = np.random.default_rng(0).choice(len(rows), min(200, len(rows)),
                                                     replace=False)
            recall = ondisk.recall_at(backend, rows, rows[np.sort(sample)].astype(np.float32),
                                      10, 1000)
            ondisk.write_manifest(tmp, {
                "format": FOLDER_FORMAT, "family": self.family, "root": self.root,
                "model": self.model, "weights": self.weights, "max_side": int(self.max_side),
                "n": len(self), "dim": int(rows.shape[1]), "dtype": "float16",
                "shards": [[f.name, c] for f, c in zip(writer.files, writer.counts)],
                "layout": backend.layout, "recall_at_10": round(recall, 4),
                "digests": bool(self.digests), "skipped": [list(s) for s in self.skipped]})
            del rows, backend                       # the mmaps, before the move
            files.replace_dir(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def with_backend(self, name: str = "exact", **options) -> "Index":
        """This index searched by another backend (`engine.backends`: "exact", "faiss"
        with kind=..., "qdrant" with location/path/url); an approximate one's recall@10
        against exact search is measured on a sample of the index's own vectors."""
        b = None if name == "exact" else backends.create(name, self.descriptors, **options)
        recall = backends.recall_at(b, self.descriptors) if b is not None else None
        return dataclasses.replace(self, backend=b, recall_at_10=recall)

    def rerooted(self, new_root) -> "Index":
        """The same index for a collection moved from `root` to `new_root`."""
        if not self.root:
            raise InputError("this index records no root folder; re-index the collection")
        new_root = str(Path(new_root).expanduser().resolve())
        old = self.root.rstrip(os.sep) + os.sep
        if isinstance(self.paths, ondisk.Strings):     # on disk: swapped as each is read
            stored = self.paths.prefix[0] if self.paths.prefix else old
            paths = self.paths.with_prefix(stored, new_root + os.sep)
            return dataclasses.replace(self, paths=paths, root=new_root)
        paths = [new_root + os.sep + p[len(old):] if p.startswith(old) else p
                 for p in self.paths]
        return dataclasses.replace(self, paths=paths, root=new_root)

    def duplicates(self, threshold: float, k: int = 10, batch: int = 4096,
                   progress: bool = False) -> list["DuplicateGroup"]:
        """Groups of near-identical images: the connected groups of the graph that links
        each image to those of its k nearest neighbours (through the index's backend, so
        it scales with it: exact on the devices, faiss or Qdrant) whose cosine similarity is
        at least `threshold`; files with the same content digest are linked whatever their
        descriptors. Largest groups first, then the most similar; see `DuplicateGroup`."""
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
                -1.0 <= float(threshold) <= 1.0):
            raise InputError(f"threshold: expected a cosine similarity in [-1, 1], got "
                             f"{threshold!r}")
        k = _positive_int(k, "k")
        n = len(self)
        if n < 2:
            return []
        kk = min(k + 1, n)                       # + the image itself
        exact = self.backend is None
        engine = backends.Exact(self.descriptors) if exact else self.backend
        edges = []                                # (similarity, i, j)
        with tqdm(total=n, desc="duplicates", unit="img", dynamic_ncols=True,
                  mininterval=2.0, disable=not progress) as bar:
            for start in range(0, n, batch):
                Q = np.asarray(self.descriptors[start:start + batch], np.float32)
                scores, ids = (engine.search(Q, kk) if exact else   # approximate: re-scored
                               ondisk.rescored(engine, self.descriptors, Q, kk, max(kk, 64)))
                scores, ids = scores[:, :kk], ids[:, :kk]
                scores = np.minimum(scores, 1.0)    # float16 rounding: cosines of 1.0002
                rows = np.arange(start, start + len(Q))[:, None]
                keep = (ids >= 0) & (ids != rows) & (scores >= threshold)
                r, c = np.nonzero(keep)
                edges += zip(scores[r, c].tolist(), (r + start).tolist(), ids[r, c].tolist())
                bar.update(len(Q))
        by_digest: dict = {}
        for i, d in enumerate(self.digests):
            if d:
                by_digest.setdefault(d, []).append(i)
        for same in by_digest.values():
            edges += [(1.0, same[0], j) for j in same[1:]]
        parent = list(range(n))

        def root(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i
        best = np.full(n, -np.inf)
        weakest: dict = {}
        for sim, i, j in sorted(edges, reverse=True):   # a maximum spanning forest
            best[i], best[j] = max(best[i], sim), max(best[j], sim)
            a, b = root(i), root(j)
            if a != b:
                parent[b] = a
                weakest[a] = min(weakest.pop(a, sim), weakest.pop(b, sim), sim)
        members: dict = {}
        for i in range(n):
            if best[i] > -np.inf:
                members.setdefault(root(i), []).append(i)
        groups = []
        for r, ids in members.items():
            ids = sorted(ids, key=lambda i: (-best[i], self.paths[i]))
            digests = {self.digests[i] for i in ids} if self.digests else {None}
            groups.append(DuplicateGroup(
                ids, [self.paths[i] for i in ids], [float(best[i]) for i in ids],
                float(weakest[r]), len(digests) == 1 and None not in digests))
        groups.sort(key=lambda g: (-len(g.ids), -g.weakest_link, g.paths[0]))
        return groups

    def search(self, model: RetrievalModel, queries, k: int = 10, *, boxes=None,
               rerank: str | None = None, rerank_k: int = 100, options: dict | None = None,
               superglobal: dict | None = None, batch_size: int = 0, bucket: int = 64,
               shortlist: int = 1000, scales=None) -> list[list[Hit]]:
        """Top-k hits per query image (a path or a list of paths), best first.

        boxes: None, or per query None or a box (x1, y1, x2, y2) in pixels of the upright
        image at full size: the query is that crop of its image (as the revisited
        benchmarks' queries are), read at the working size (`images.max_side()`; a
        CLI query or the server uses the index's `max_side`).

        rerank: None, or a reranker of `scvnet_jax.rerank.registry` (`registry.names()`),
        with its `options` (e.g. {"weights": ...} for one that needs weights;
        `superglobal=` is the same as `options`, kept for older callers); rerank_k: how
        many of the top hits a reranker with a depth re-orders (its `depth` option, unless
        given in `options` or, for a model that records one, taken from the model).

        Each hit's score is the one the final ranking is sorted by: the cosine similarity
        of the global descriptors (rerank=None); for a reranker, the score it sorted by
        (`registry.RERANKERS[name].score`). A reranker whose scores have a scale of their
        own (`every_hit`) reranks at least the top k, so every hit has its score; hits
        below the depth of the others keep the cosine similarity (which is below their
        score).

        With an approximate backend (`backend`: faiss, qdrant) the first stage is each
        query's top `shortlist` (at least k) from it, and a reranker works on the union of
        those candidates (`registry.from_candidates`); exact search ranks everything.

        scales: the queries' descriptor scales (`describe`; None: the family's, as the
        index was built)."""
        queries = _query_paths(queries)
        refs = [ImageRef(q, b) for q, b in zip(queries, _boxes(boxes, len(queries)))]
        k = _positive_int(k, "k")
        scales = _scales(self.family, scales)
        if rerank is not None and rerank not in registry.RERANKERS:
            raise InputError(f"rerank must be None or one of {', '.join(registry.names())}, "
                             f"got {rerank!r}")
        if superglobal and rerank is not None:   # the former way to give its options
            options = {**superglobal, **(options or {})}
        opts = {}
        if rerank is not None:      # the caller's values, checked before any is converted
            r, given = registry.get(rerank), dict(options or {})
            try:
                opts = registry.options(rerank, given)
            except ValueError as e:     # ConfigError: the option, its value, the type
                raise InputError(str(e)) from None
            if r.needs_weights and not opts.get("weights"):
                raise InputError(f"rerank {rerank} needs weights: options {{'weights': PATH}} "
                                 f"(a {rerank} model directory or an official checkpoint)")
            opts = registry.prepare(rerank, opts)    # weights loaded and checked now
            opts = registry.with_depth(rerank, opts, given,
                                       _positive_int(rerank_k, "rerank_k"), k, len(self))
        extract.check_images(refs)   # before any work
        # one query image per device and batch: batches are padded to their full row count,
        # so a lone query at batch_size 8 would cost eight (its scales and regions fall in
        # different size buckets anyway); batch_size is for the database images rerankers read
        Q = describe(model, refs, self.family, batch_size=1, bucket=bucket, scales=scales,
                     progress=False)    # a bar per query would fill the server's log
        if self.backend is not None:     # only the candidates' vectors are read
            return self._search_shortlist(model, Q, refs, k, rerank, opts, shortlist,
                                          {"batch_size": batch_size, "bucket": bucket,
                                           "cache_dir": _token_cache()})
        X = self.descriptors.astype(np.float32)
        sim, ranks = rank(X, Q)                         # (N, n_q) each
        found, gone = {}, [{} for _ in refs]
        if rerank is not None and registry.get(rerank).needs_images:
            ranks, opts = _without_gone(self.paths, ranks, rerank, opts, found, gone)
        top = np.take_along_axis(sim, ranks, axis=0)    # similarity, in ranking order
        if rerank is not None:
            out = registry.rerank(rerank, registry.Inputs(
                X, Q, ranks, sim, model=model, query_images=refs,
                db_images=[ImageRef(p) for p in self.paths],
                settings={"batch_size": batch_size, "bucket": bucket,
                          "cache_dir": _token_cache()}), **opts)
            ranks = out.ranks
            top = np.take_along_axis(sim, ranks, axis=0)
            top[:out.scores.shape[0]] = out.scores
        return [_hits(self.paths, ranks[:, i], top[:, i], k, found, gone[i])
                for i in range(len(queries))]

    def _search_shortlist(self, model, Q, refs, k, rerank, opts, shortlist, settings):
        S = min(len(self), max(k, _positive_int(shortlist, "shortlist")))
        # the shortlist re-scored exactly from the stored vectors (only they are read)
        scores, ids = ondisk.rescored(self.backend, self.descriptors, Q, k, S)
        found, gone = {}, [{} for _ in refs]
        if rerank is None:
            return [_hits(self.paths, ids[i][ids[i] >= 0], scores[i][ids[i] >= 0], k, found,
                          gone[i]) for i in range(len(Q))]
        ids = np.where(ids < 0, ids[:, :1], ids)         # too few found: repeat the best
        inputs, rows = registry.from_candidates(
            Q, ids, lambda r: self.descriptors[np.asarray(r)].astype(np.float32))
        paths = [self.paths[int(j)] for j in rows]
        if registry.get(rerank).needs_images:
            ranks, opts = _without_gone(paths, inputs.ranks, rerank, opts, found, gone)
            inputs = dataclasses.replace(inputs, ranks=ranks)
        inputs = dataclasses.replace(inputs, model=model, query_images=refs,
                                     db_images=[ImageRef(self.paths[int(j)]) for j in rows],
                                     settings=settings)
        depth = registry.get(rerank).depth
        if depth:               # the candidates are all there is to rerank
            opts = {**opts, depth: min(int(opts[depth]), len(rows))}
        out = registry.rerank(rerank, inputs, **opts)
        top = np.take_along_axis(inputs.sim, out.ranks, axis=0)
        top[:out.scores.shape[0]] = out.scores
        return [_hits(paths, out.ranks[:, i], top[:, i], k, found, gone[i])
                for i in range(len(Q))]

    def search_regions(self, model: RetrievalModel, query, k: int = 10, *, regions: int = 5,
                       box=None, region_scales=None, **search_options
                       ) -> tuple[list[Hit], list]:
        """One query image searched whole (or cropped to `box`) and by up to `regions`
        regions that the network proposes (`scvnet_jax.regions`); the hit lists (each the
        top k, reranked as `search_options` say) are merged by each image's best score.
        The whole query is described as the index was (the family's three scales), the
        regions at `region_scales` (None: `REGION_SCALES`, one scale; pass the family's
        three to describe them as the whole). Returns (hits, the regions searched, as
        boxes in pixels)."""
        from scvnet_jax import regions as proposals

        (query,) = _query_paths(query)
        regions = _positive_int(regions, "regions") if regions else 0
        region_scales = _scales(self.family, REGION_SCALES[self.family]
                                if region_scales is None else region_scales)
        im = read_image(ImageRef(query, _boxes([box], 1)[0]))
        found = proposals.propose(model, im, regions, search_options.get("bucket", 64))
        size = image_io.image_size(query)   # regions of the crop, in the image's pixels
        working = image_io.working_size(*size)
        x0, y0 = (0, 0) if box is None else image_io.box_at(box, size, working)[:2]
        fx, fy = size[0] / working[0], size[1] / working[1]
        lo = (0, 0) if box is None else (int(box[0]), int(box[1]))      # inside the box
        hi = size if box is None else (min(size[0], int(box[2])), min(size[1], int(box[3])))
        found = [(max(lo[0], round((x0 + r[0]) * fx)), max(lo[1], round((y0 + r[1]) * fy)),
                  min(hi[0], round((x0 + r[2]) * fx)), min(hi[1], round((y0 + r[3]) * fy)))
                 for r in found]
        lists = self.search(model, query, k, boxes=[box], **search_options)
        if found:
            lists += self.search(model, [query] * len(found), k, boxes=found,
                                 scales=region_scales, **search_options)
        best: dict = {}
        for hits in lists:
            for h in hits:
                best[h.path] = max(best.get(h.path, -np.inf), h.score)
        merged = sorted(best.items(), key=lambda ps: -ps[1])[:k]
        missing = dict.fromkeys(p for hits in lists for p in getattr(hits, "missing", ()))
        return Hits([Hit(p, s) for p, s in merged], missing), found


ON_ERROR = ("raise", "skip")


def _first_present(paths, column, depth: int, found: dict, gone: dict) -> list[int]:
    """Positions of the first `depth` entries of `column` (rows of `paths`) whose files
    exist; each file is looked at once per search (`found`: row -> exists) and the ones
    that no longer exist are added to `gone` (path -> None, in ranking order)."""
    out = []
    for pos, j in enumerate(column):
        j = int(j)
        if j not in found:
            found[j] = os.path.isfile(paths[j])
        if not found[j]:
            gone[paths[j]] = None
        elif len(out) < depth:
            out.append(pos)
            if len(out) == depth:
                break
    return out


def _without_gone(paths, ranks, rerank, opts, found, gone):
    """For a reranker that reads the database images: its candidates (each query's top
    topk / k) without the files deleted since indexing: those are moved to the end of
    every ranking and the depth is capped to the files still there (a reranker without a
    depth reads them all)."""
    key = registry.get(rerank).depth
    depth = int(opts[key]) if key else len(paths)
    for i in range(ranks.shape[1]):
        _first_present(paths, ranks[:, i], depth, found, gone[i])
    missing = [j for j, there in found.items() if not there]
    if not missing:
        return ranks, opts
    if len(missing) == len(paths):
        raise InputError(f"none of the indexed files exists any more (e.g. {paths[0]}): "
                         "re-index the collection, or give --root if it moved")
    last = np.isin(ranks, missing)
    ranks = np.take_along_axis(ranks, np.argsort(last, axis=0, kind="stable"), axis=0)
    return ranks, ({**opts, key: min(depth, len(paths) - len(missing))} if key else opts)


def _hits(paths, column, scores, k: int, found: dict, gone: dict) -> Hits:
    """The top k of one ranking whose files still exist, and those that do not."""
    keep = _first_present(paths, column, k, found, gone)
    return Hits([Hit(paths[int(column[pos])], float(scores[pos])) for pos in keep], gone)


def _token_cache() -> str:
    """Where rerankers keep per-image values between queries (AMES's database tokens,
    content-keyed): the package's cache folder ($XDG_CACHE_HOME/scvnet_jax or
    ~/.cache/scvnet_jax), as eval.py's."""
    from scvnet_jax.evaluation.config import default_cache_dir
    return default_cache_dir()


def _positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise InputError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


def _scales(family: str, scales):
    """None, or descriptor scales checked for `family`: positive factors, or for superglobal
    also 1, 3 or 5 (its official scale lists)."""
    if scales is None or (family == "superglobal" and not isinstance(scales, bool)
                          and scales in (1, 3, 5)):
        return scales
    try:
        factors = () if isinstance(scales, str) else tuple(float(v) for v in scales)
    except (TypeError, ValueError):
        factors = ()
    if not factors or not all(0 < v < float("inf") for v in factors):
        raise InputError(f"scales {scales!r}: expected positive scale factors, e.g. (1.0,)"
                         + (" or 1, 3, 5" if family == "superglobal" else ""))
    return factors


def _boxes(boxes, n: int) -> list:
    """None or one box (x1, y1, x2, y2) per query, as float tuples."""
    if boxes is None:
        return [None] * n
    if len(boxes) != n:
        raise InputError(f"boxes: one per query expected ({n}), got {len(boxes)}")
    out = []
    for b in boxes:
        if b is not None:
            try:
                b = tuple(float(v) for v in b)
            except (TypeError, ValueError):
                raise InputError(f"box {b!r}: expected four numbers x1, y1, x2, y2") from None
            if len(b) != 4:
                raise InputError(f"box {b!r}: expected four numbers x1, y1, x2, y2")
        out.append(b)
    return out


def _query_paths(queries) -> list[str]:
    """A single path or a sequence of paths -> list of str (checked to exist)."""
    if isinstance(queries, (str, os.PathLike)):
        queries = [queries]
    elif not isinstance(queries, Sequence) or not queries:
        raise InputError(f"queries must be an image path or a non-empty list of paths, got "
                         f"{type(queries).__name__}")
    out = []
    for q in queries:
        if not isinstance(q, (str, os.PathLike)):
            raise InputError(f"queries must be paths, got {type(q).__name__} {q!r:.60}")
        if not Path(q).is_file():
            raise InputError(f"{q}: query image not found")
        out.append(os.fspath(q))
    return out


def index_folder(model: RetrievalModel, folder, family: str = "cvnet", *,
                 batch_size: int = 0, bucket: int = 64, workers: int = 4,
                 on_error: str = "raise") -> Index:
    """Indexes every image under `folder` (see `list_images`), with absolute paths.

    on_error: "raise" stops at the first unreadable, oversized, truncated or corrupt image
    with an InputError naming it; "skip" leaves such files out, lists each with its reason
    on stderr and in `Index.skipped`, and indexes the rest."""
    if on_error not in ON_ERROR:
        raise InputError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if family not in FAMILIES:
        raise InputError(f"family must be one of {FAMILIES}, got {family!r}")
    root = Path(folder).expanduser().resolve()
    paths = [str(p) for p in list_images(root)]
    skipped = []
    if on_error == "skip":
        reasons = extract.image_errors([ImageRef(p) for p in paths], workers)
        skipped = [(p, r) for p, r in zip(paths, reasons) if r is not None]
        for _, reason in skipped:
            print(f"skipped: {reason}", file=sys.stderr)
        paths = [p for p, r in zip(paths, reasons) if r is None]
        if not paths:
            raise InputError(f"{root}: none of its images could be read ({len(skipped)} "
                             "skipped)")
    X = describe(model, paths, family, batch_size=batch_size, bucket=bucket, workers=workers,
                 desc=f"index {os.fspath(folder)}")
    with ThreadPoolExecutor(workers) as pool:
        digests = content_digests([ImageRef(p) for p in paths], pool)
    return Index(paths, X, family, str(root), skipped, digests,
                 model_key(model, family, "float32"), max_side=image_io.max_side())


def result_grid(query, hits: Sequence[Hit], topn: int = 10, title: str = "") -> np.ndarray:
    """BGR uint8 image: the query (blue border) and its top hits with their scores."""
    return visuals.hits_row(read_image(ImageRef(str(query))),
                            [(read_image(ImageRef(h.path)), f"{h.score:.3f}")
                             for h in hits[:topn]], title)


FAISS_THRESHOLD = 200_000     # backend="auto": faiss from this many images on


def _has_faiss() -> bool:
    import importlib.util
    return importlib.util.find_spec("faiss") is not None


def model_key(model: RetrievalModel, family: str, dtype: str = "float32",
              max_side: int | None = None) -> str:
    """What an index's descriptors depend on: the backbone's weights (the rerank head does
    not change them), the descriptor and its settings, the stored dtype, the working size
    (None: `images.max_side()`; 0, full size, leaves the key as before it was recorded)."""
    spec = extract.spec_of(family)
    side = image_io.max_side() if max_side is None else max_side
    return files.sha256_text(json.dumps({
        "weights": weights_fingerprint(model.variables, BACKBONE), "spec": repr(spec),
        "dtype": dtype, **({"max_side": side} if side else {})}, sort_keys=True))


def recorded_max_side(path) -> int:
    """The working size the index file `path` was built at (0 for one from before it was
    recorded), or the current one (`images.max_side()`) where there is no index to read."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return int(z["max_side"]) if "max_side" in z.files else 0
    except Exception:   # noqa: BLE001  (no file, or not an index: update_index says so)
        return image_io.max_side()


def _read_or_reason(path: str):
    try:
        return read_image(ImageRef(path))
    except InputError as e:
        return str(e)


def _extract_chunk(model, idx, paths, digests, key, parts, spec, dtype, batch_size,
                   bucket, on_error, pool, bar, say_skipped: bool = True,
                   part: str | None = None):
    """One chunk of new images (rows `idx` of `paths`): read, described, saved as a part
    of `parts` (so a killed run keeps it). Returns (rows described, [(row, reason)]
    skipped, their descriptors or None, the (row, reason) that stops the run under
    on_error="raise" or None). `part`: the part's file name (default: a new one)."""
    images, good, skipped = [], [], []
    for i, im in zip(idx, pool.map(_read_or_reason, [paths[i] for i in idx])):
        if isinstance(im, str):
            if on_error == "raise":
                return good, skipped, None, (i, im)
            skipped.append((i, im))
            if say_skipped:
                bar.write(f"skipped: {im}", file=sys.stderr)
            bar.update(1)
        else:
            images.append(im)
            good.append(i)
    if not images:
        return good, skipped, None, None
    D = extract.describe_images(model, images, spec, batch_size, bucket, bar).astype(dtype)
    try:
        files.atomic_save_npz(parts / (part or f"chunk_{uuid.uuid4().hex}.npz"),
                              model=np.array(key),
                              descriptors=D,
                              digests=np.array([digests[i] for i in good], dtype=str))
    except OSError:     # OutputError (e.g. the disk filled): no empty folder left
        if parts.is_dir() and not any(parts.iterdir()):
            parts.rmdir()
        raise
    return good, skipped, D, None


def _extract_chunks(model, chunks, *args):
    """_extract_chunk for each chunk in turn, as they finish (stops at an error)."""
    for idx in chunks:
        out = _extract_chunk(model, idx, *args)
        yield out
        if out[3] is not None:
            return


def update_index(model: RetrievalModel, folder, path, family: str = "cvnet", *,
                 weights: str = "", dtype: str = "float16", on_error: str = "skip",
                 rebuild: bool = False, backend: str = "auto", faiss_kind: str = "hnsw",
                 chunk_size: int = 64, batch_size: int = 0, bucket: int = 64,
                 workers: int = 4, ray: str | None = None,
                 ray_actors: int | None = None) -> tuple[Index, dict]:
    """Brings the index file `path` up to date with every image under `folder` and returns
    it with counts: a rerun extracts only new or changed files (by content digest, so a
    renamed or copied photo is not extracted again) and drops deleted ones.

    Resumable: finished chunks of `chunk_size` new images are written to `<path>.parts/`
    as they are done, so a run killed at any point and rerun extracts only what is still
    missing; the index is written atomically at the end, then the parts are removed. An
    existing file at `path` that is not an index is refused, never overwritten; an index
    built with another model, descriptor, dtype or working size (`images.max_side()`, which
    images are read at) is refused unless `rebuild`, which re-extracts every image (neither
    the old index nor earlier parts are reused). A folder the index cannot be written to
    (read-only, full) is refused before any extraction.
    `weights` is recorded for the queries ("demo" or the path the model came from; by
    default the one the index already records).

    backend: "exact" (search every vector on the device), "faiss" (a faiss index of
    `faiss_kind`, stored inside the index file, with its recall@10 against exact search
    measured on 200 of the index's own vectors), or "auto": faiss from FAISS_THRESHOLD
    images on when faiss is installed, else exact. The faiss index is rebuilt when the
    collection changed.

    Several processes (`jax.distributed`, a filesystem they all see): every process calls
    this with the same arguments. File i's digest is computed by process i % count and
    chunk c of the new images is extracted by process c % count on its devices (its parts
    saved as above, so a killed run resumes with every process's finished chunks); digests,
    skipped files, errors (the first one raised on every process) and descriptors are
    gathered; process 0 alone writes the index and removes the parts, the others then load
    it. All return the same index and stats (counts over all processes); the progress bar
    shows process 0's work.

    ray: the address of a Ray cluster ("auto", "HOST:PORT", "ray://..."): the new images'
    chunks are extracted by a Ray Data job instead, a model per actor (`ray_extract`;
    `ray_actors` of them, default one per GPU or per node), its parts written to
    `<path>.parts/`, which every worker must see; the rest (digests, the index) as above."""
    if ray is not None and mesh.process_count() > 1:
        raise InputError("ray: extraction runs either on Ray or on jax.distributed "
                         "processes, not both")
    if ray_actors is not None:
        ray_actors = _positive_int(ray_actors, "ray_actors")
    from scvnet_jax import ray_extract      # (imports Ray only when a job runs)
    if ray is not None:
        ray_extract.check_address(ray)
    if on_error not in ON_ERROR:
        raise InputError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if family not in FAMILIES:
        raise InputError(f"family must be one of {FAMILIES}, got {family!r}")
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if backend not in ("auto", "exact", "faiss"):
        raise InputError(f"backend must be auto, exact or faiss, got {backend!r}")
    if faiss_kind not in backends.KINDS["faiss"]:
        raise InputError(f"faiss_kind must be one of {backends.KINDS['faiss']}, got "
                         f"{faiss_kind!r}")
    chunk_size = _positive_int(chunk_size, "chunk_size")
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise InputError(f"{path}: is a folder; the index is a file (e.g. photos.index)")
    root = Path(folder).expanduser().resolve()
    paths = [str(p) for p in list_images(root)]
    old = Index.load(path) if path.exists() else None
    if mesh.process_index() == 0:
        _check_writable(path)       # before any extraction
    key = model_key(model, family, dtype)
    if old is not None and old.model != key and not rebuild:
        raise InputError(f"{path}: built with another model, descriptor family, dtype or "
                         f"working size (weights {old.weights or 'unknown'}, family "
                         f"{old.family}, {old.descriptors.dtype}, max_side {old.max_side}); "
                         "rebuild it (--rebuild) or name another index file")
    t0 = time.perf_counter()
    pid, nproc = mesh.process_index(), mesh.process_count()
    known: dict = {}
    if old is not None and old.model == key and not rebuild:
        known.update(zip(old.digests, old.descriptors))
    if old is not None and old.model == key:
        weights = weights or old.weights
    if ray is not None and not weights:       # before any digest is read
        raise InputError("ray: the actors load the model from its weights; give weights= "
                         "(the path the model was loaded from, or 'demo')")
    parts = path.with_name(path.name + ".parts")
    for part in [] if rebuild else sorted(parts.glob("chunk_*.npz")):
        try:
            with np.load(part, allow_pickle=False) as z:
                if str(z["model"]) == key:
                    known.update(zip([str(d) for d in z["digests"]], z["descriptors"]))
        except Exception:   # noqa: BLE001  (a damaged part is recomputed)
            continue
    with ThreadPoolExecutor(workers) as pool:
        digests = (content_digests([ImageRef(p) for p in paths], pool) if nproc == 1
                   else _gathered_digests(paths, pool))
        reused = sum(d in known for d in digests)
        todo = [i for i, d in enumerate(digests) if d not in known]
        mine = [s for c, s in enumerate(range(0, len(todo), chunk_size))
                if mesh.owner(c) == pid]
        total = sum(len(todo[s:s + chunk_size]) for s in mine)
        spec = extract.spec_of(family)
        skipped, error, rows, new = [], None, [], []   # skipped: (file index, reason)
        with tqdm(total=total, desc=f"index {os.fspath(folder)}", unit="img",
                  dynamic_ncols=True, mininterval=2.0, disable=pid != 0 or not total) as bar:
            chunks = [todo[start:start + chunk_size] for start in mine]
            done = (_extract_chunks(model, chunks, paths, digests, key, parts, spec, dtype,
                                    batch_size, bucket, on_error, pool, bar, pid == 0)
                    if ray is None else ray_extract.extract_chunks(
                        ray, chunks, paths, digests, key, parts, family, dtype, weights,
                        batch_size, bucket, on_error, ray_actors, bar))
            for good, bad, D, err in done:
                skipped += bad
                if err is not None:
                    if nproc == 1:
                        raise InputError(err[1])
                    error = err         # raised after the gather, on every process
                    break
                if D is not None:
                    known.update(zip([digests[i] for i in good], D))
                    rows += good
                    new.append(D)
    if nproc > 1:
        skipped, rows, D = _gathered_work(skipped, error, rows, new,
                                          model.arch.reduction_dim, dtype)
        known.update(zip([digests[i] for i in rows], D))
    extracted = len(rows)
    skipped = [(paths[i], reason) for i, reason in skipped]
    bad = {p for p, _ in skipped}
    keep = [i for i, p in enumerate(paths) if p not in bad]
    if not keep:
        raise InputError(f"{root}: none of its images could be read ({len(skipped)} skipped)")
    X = np.stack([known[digests[i]] for i in keep]).astype(dtype)
    index = Index([paths[i] for i in keep], X, family, str(root), skipped,
                  [digests[i] for i in keep], key, weights, max_side=image_io.max_side())
    failed = None
    if pid == 0:
        try:
            if backend == "auto":
                backend = ("faiss" if len(index) >= FAISS_THRESHOLD and _has_faiss()
                           else "exact")
            if backend == "faiss":
                same = (old is not None and getattr(old.backend, "kind", None) == faiss_kind
                        and old.model == key and old.paths == index.paths
                        and old.digests == index.digests)
                index = (dataclasses.replace(index, backend=old.backend,
                                             recall_at_10=old.recall_at_10)
                         if same else index.with_backend("faiss", kind=faiss_kind))
            index.save(path)
            for part in [*parts.glob("chunk_*.npz"), *parts.glob(RAY_MANIFEST)]:   # ours:
                part.unlink()                       # written above or by a killed run
            if parts.is_dir() and not any(parts.iterdir()):
                parts.rmdir()
        except (InputError, OSError) as e:
            if nproc == 1:
                raise
            failed = e
    seconds = time.perf_counter() - t0
    if nproc > 1:       # waits for process 0's index file; its time is everyone's
        message, seconds = mesh.allgather_json(
            [None if failed is None else str(failed), seconds] if pid == 0 else None)[0]
        if failed is not None:
            raise failed
        if message is not None:
            raise InputError(f"process 0 could not write the index: {message}")
        if pid != 0:
            index = Index.load(path)
    now = set(index.paths)
    stats = {"images": len(paths), "indexed": len(index), "reused": reused,
             "extracted": extracted, "skipped": len(skipped),
             "removed": 0 if old is None else sum(p not in now for p in old.paths),
             "backend": "exact" if index.backend is None else
             f"faiss {index.backend.kind}", "recall_at_10": index.recall_at_10,
             "seconds": round(seconds, 3),
             "images_per_second": round(extracted / seconds, 3) if extracted else None}
    return index, stats


def _check_writable(path: Path) -> None:
    """An InputError unless a file can be written next to the index `path` (a read-only,
    full or missing folder is found before any extraction): a probe is created there and
    removed."""
    probe = path.with_name(f".{path.name}.{uuid.uuid4().hex}.probe")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(f"{path}: cannot write the index in {path.parent} "
                          f"({e.strerror or e}); nothing was extracted") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def _gathered_digests(paths: list[str], pool) -> list[str]:
    """Several processes: the content digest of every file of `paths`, in order; file i's
    computed by process owner(i), then gathered. An unreadable file raises everywhere."""
    mine = [i for i in range(len(paths)) if mesh.owner(i) == mesh.process_index()]
    try:
        digests, error = content_digests([ImageRef(paths[i]) for i in mine], pool), None
    except InputError as e:
        digests, error = [], str(e)
    found = mesh.allgather_json({"rows": mine, "digests": digests, "error": error})
    errors = [f["error"] for f in found if f["error"] is not None]
    if errors:
        raise InputError(errors[0])
    out: list = [None] * len(paths)
    for f in found:
        for i, d in zip(f["rows"], f["digests"]):
            out[i] = d
    return out


def _gathered_work(skipped, error, rows, new, dim: int, dtype: str):
    """Several processes: every process's skipped files (file index, reason), sorted, and
    the file indices and descriptors it extracted; the first error (by file index) of any
    process is raised on all. Process 0 reports the others' skipped files."""
    found = mesh.allgather_json({"skipped": skipped, "error": error})
    errors = sorted(tuple(f["error"]) for f in found if f["error"] is not None)
    if errors:
        raise InputError(errors[0][1])
    if mesh.process_index() == 0:
        for f in found[1:]:
            for _, reason in f["skipped"]:
                tqdm.write(f"skipped: {reason}", file=sys.stderr)
    skipped = sorted((int(i), str(r)) for f in found for i, r in f["skipped"])
    rows = mesh.allgather_rows(np.asarray(rows, np.int64))
    D = mesh.allgather_rows(np.concatenate(new) if new else np.zeros((0, dim), dtype))
    return skipped, [int(i) for i in rows], D
