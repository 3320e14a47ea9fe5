"""Search your own image collection: index a folder, query it, look at the results.

    import scvnet_jax as sj
    model = sj.load("CVPR2022_CVNet_R50.pyth")           # or sj.demo_model_path()
    index = sj.search.index_folder(model, "photos/")     # descriptors of every image
    index.save("photos.index.npz")                       # reload with sj.search.Index.load
    hits = index.search(model, ["query.jpg"], k=10)     # [[Hit(path, score), ...]]
    grid = sj.search.result_grid("query.jpg", hits[0])   # BGR uint8 image of the top hits

Descriptors are extracted and searched by the same engine as eval.py (`scvnet_jax.engine`;
`family="cvnet"`: CVNet-Global over three OpenCV scales; `"superglobal"`: the SuperGlobal
descriptor), with the same size buckets, threads, devices and progress bar.
`search(..., rerank=NAME)` refines the ranking with any reranker of the registry
(`scvnet_jax.rerank.registry`): "superglobal", "cvnet" (the CVNet verifier on the top
`rerank_k`, similarity + 0.5 x score, the blind protocol), "icfrr", "csa" (options
{"weights": ...}), "alpha_qe", "dba"; `options` sets the reranker's options.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from scvnet_jax import files
from scvnet_jax.api import RetrievalModel
from scvnet_jax.engine import extract
from scvnet_jax.engine.search import rank
from scvnet_jax.errors import InputError
from scvnet_jax.evaluation import visuals
from scvnet_jax.images import ImageRef, read_image
from scvnet_jax.rerank import registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FAMILIES = tuple(extract.FAMILIES)
FORMAT = "scvnet_jax.search.index/1"


@dataclasses.dataclass(frozen=True)
class Hit:
    path: str
    score: float


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
             batch_size: int = 8, bucket: int = 64, workers: int = 4,
             desc: str = "describe") -> np.ndarray:
    """Descriptors (N, D), L2-normalised, of image files (paths)."""
    refs = [ImageRef(str(p)) for p in images]
    return extract.extract(model, refs, extract.spec_of(family), batch_size=batch_size,
                           bucket=bucket, workers=workers, desc=desc)


@dataclasses.dataclass
class Index:
    """Descriptors of a collection: `paths[i]` (absolute) has `descriptors[i]`; `root` is the
    folder that was indexed (`rerooted` moves the paths to where the collection is now);
    `skipped` lists (path, reason) of files left out by `index_folder(on_error="skip")`."""
    paths: list[str]
    descriptors: np.ndarray
    family: str = "cvnet"
    root: str = ""
    skipped: list = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def save(self, path) -> Path:
        """One .npz (no pickle), written atomically."""
        path = Path(path)
        files.atomic_save_npz(path, format=np.array(FORMAT), family=np.array(self.family),
                              root=np.array(self.root), paths=np.array(self.paths, dtype=str),
                              descriptors=self.descriptors.astype(np.float32))
        return path

    @classmethod
    def load(cls, path, root=None) -> "Index":
        """An index saved by `save`; `root`: where the indexed folder is now (see `rerooted`).
        A missing, damaged or foreign file is one InputError naming it."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format" not in z.files or str(z["format"]) != FORMAT:
                    raise InputError(f"{path}: not a scvnet_jax search index (expected a "
                                     f"file written by Index.save, format {FORMAT})")
                index = cls([str(p) for p in z["paths"]], np.asarray(z["descriptors"]),
                            str(z["family"]), str(z["root"]) if "root" in z.files else "")
        except InputError:
            raise
        except Exception as e:   # zip, npy and OS errors of a damaged file alike
            raise InputError(f"{path}: cannot read the search index, the file is damaged or "
                             f"not an index ({type(e).__name__}: {e})") from None
        if index.descriptors.ndim != 2 or index.descriptors.shape[0] != len(index.paths):
            raise InputError(f"{path}: damaged search index ({len(index.paths)} paths, "
                             f"descriptors of shape {index.descriptors.shape})")
        return index.rerooted(root) if root is not None else index

    def rerooted(self, new_root) -> "Index":
        """The same index for a collection moved from `root` to `new_root`."""
        if not self.root:
            raise InputError("this index records no root folder; re-index the collection")
        new_root = str(Path(new_root).expanduser().resolve())
        old = self.root.rstrip(os.sep) + os.sep
        paths = [new_root + os.sep + p[len(old):] if p.startswith(old) else p
                 for p in self.paths]
        return dataclasses.replace(self, paths=paths, root=new_root)

    def search(self, model: RetrievalModel, queries, k: int = 10, *,
               rerank: str | None = None, rerank_k: int = 100, options: dict | None = None,
               superglobal: dict | None = None, batch_size: int = 8,
               bucket: int = 64) -> list[list[Hit]]:
        """Top-k hits per query image (a path or a list of paths), best first.

        rerank: None, or a reranker of `scvnet_jax.rerank.registry` ("superglobal", "cvnet",
        "icfrr", "csa", "alpha_qe", "dba"), with its `options` (e.g. {"weights": ...} for
        csa; `superglobal=` is the same as options for "superglobal"); rerank_k: how many
        the cvnet and csa rerankers re-order (their `topk`).

        Each hit's score is the one the final ranking is sorted by: the cosine similarity
        of the global descriptors (rerank=None); for a reranker, the score it sorted by
        (`registry.RERANKERS[name].score`): for superglobal, (similarity to the query +
        to the expanded query) / 2 of the augmented descriptors (M is raised to k, so every
        hit is reranked); for cvnet, similarity + 0.5 x the verification score in [0, 1];
        for csa, the cosine of the CSA output tokens (its topk is raised to k, so every hit
        is reranked); for icfrr, -distance + beta x votes; for alpha_qe / dba, the
        similarity to the expanded query / augmented descriptor. Hits below cvnet's top
        `rerank_k` keep the cosine similarity (which is below their score)."""
        queries = _query_paths(queries)
        k = _positive_int(k, "k")
        if rerank is not None and rerank not in registry.RERANKERS:
            raise InputError(f"rerank must be None or one of {', '.join(registry.names())}, "
                             f"got {rerank!r}")
        opts = dict(options or {})
        if rerank == "superglobal":
            opts = {**(superglobal or {}), **opts}
            opts["M"] = min(max(int(opts.get("M", 400)), k), len(self))   # every hit reranked
        if rerank in ("cvnet", "csa") and "topk" not in opts:
            opts["topk"] = _positive_int(rerank_k, "rerank_k")
        if rerank == "csa":               # CSA scores are not similarities: rerank every hit
            opts["topk"] = max(int(opts["topk"]), k)
        if rerank is not None:
            try:
                registry.options(rerank, opts)
            except Exception as e:
                raise InputError(str(e)) from None
        extract.check_images([ImageRef(q) for q in queries])   # before any work
        Q = describe(model, queries, self.family, batch_size=batch_size, bucket=bucket,
                     desc="queries")
        X = self.descriptors
        sim, ranks = rank(X, Q)                         # (N, n_q) each
        top = np.take_along_axis(sim, ranks, axis=0)    # similarity, in ranking order
        if rerank is not None:
            out = registry.rerank(rerank, registry.Inputs(
                X, Q, ranks, sim, model=model, query_images=[ImageRef(q) for q in queries],
                db_images=[ImageRef(p) for p in self.paths],
                settings={"batch_size": batch_size, "bucket": bucket}), **opts)
            ranks = out.ranks
            top = np.take_along_axis(sim, ranks, axis=0)
            top[:out.scores.shape[0]] = out.scores
        return [[Hit(self.paths[int(j)], float(top[pos, i]))
                 for pos, j in enumerate(ranks[:k, i])] for i in range(len(queries))]


ON_ERROR = ("raise", "skip")


def _positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise InputError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


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
                 batch_size: int = 8, bucket: int = 64, workers: int = 4,
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
    return Index(paths, X, family, str(root), skipped)


def result_grid(query, hits: Sequence[Hit], topn: int = 10, title: str = "") -> np.ndarray:
    """BGR uint8 image: the query (blue border) and its top hits with their scores."""
    return visuals.hits_row(read_image(ImageRef(str(query))),
                            [(read_image(ImageRef(h.path)), f"{h.score:.3f}")
                             for h in hits[:topn]], title)
