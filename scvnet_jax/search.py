"""Search your own image collection: index a folder, query it, look at the results.

    import scvnet_jax as sj
    model = sj.load("CVPR2022_CVNet_R50.pyth")           # or sj.demo_model_path()
    index = sj.search.index_folder(model, "photos/")     # descriptors of every image
    index.save("photos.index.npz")                       # reload with sj.search.Index.load
    hits = index.search(model, ["query.jpg"], k=10)     # [[Hit(path, score), ...]]
    grid = sj.search.result_grid("query.jpg", hits[0])   # BGR uint8 image of the top hits

Descriptors are extracted and searched by the same engine as eval.py (`scvnet_jax.engine`;
`family="cvnet"`: CVNet-Global over three OpenCV scales; `"superglobal"`: the SuperGlobal
descriptor), with the same size buckets, threads, devices and progress bar. `search(..., rerank="superglobal")` refines the ranking with
SuperGlobal reranking; `rerank="cvnet"` reranks the top `rerank_k` with the CVNet verifier
(similarity + 0.5 x score, the blind protocol).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from scvnet_jax import files, rerank as rr
from scvnet_jax.api import RetrievalModel
from scvnet_jax.engine import extract, verify
from scvnet_jax.engine.search import rank
from scvnet_jax.errors import InputError
from scvnet_jax.evaluation import visuals
from scvnet_jax.images import ImageRef, read_image

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
    """Descriptors of a collection: `paths[i]` has `descriptors[i]`."""
    paths: list[str]
    descriptors: np.ndarray
    family: str = "cvnet"

    def __len__(self) -> int:
        return len(self.paths)

    def save(self, path) -> Path:
        """One .npz (no pickle), written atomically."""
        path = Path(path)
        files.atomic_save_npz(path, format=np.array(FORMAT), family=np.array(self.family),
                        paths=np.array(self.paths, dtype=str),
                        descriptors=self.descriptors.astype(np.float32))
        return path

    @classmethod
    def load(cls, path) -> "Index":
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["format"]) != FORMAT:
                    raise InputError(f"{path}: not a scvnet_jax search index")
                return cls([str(p) for p in z["paths"]], np.asarray(z["descriptors"]),
                           str(z["family"]))
        except (OSError, KeyError, ValueError) as e:
            raise InputError(f"{path}: cannot read the search index ({e})") from None

    def search(self, model: RetrievalModel, queries: Sequence, k: int = 10, *,
               rerank: str | None = None, rerank_k: int = 100,
               superglobal: dict | None = None, batch_size: int = 8,
               bucket: int = 64) -> list[list[Hit]]:
        """Top-k hits per query image (paths), best first."""
        Q = describe(model, queries, self.family, batch_size=batch_size, bucket=bucket,
                     desc="queries")
        X = self.descriptors
        sim, ranks = rank(X, Q)                         # (N, n_q) each
        if rerank == "superglobal":
            opts = {"M": min(400, len(self)), "K": 9, "beta": 0.15, **(superglobal or {})}
            ranks = np.asarray(rr.superglobal(jnp.asarray(X), jnp.asarray(Q), ranks, **opts))
        elif rerank == "cvnet":
            ranks = self._cvnet_rerank(model, queries, sim, ranks, rerank_k, batch_size, bucket)
        elif rerank is not None:
            raise ValueError(f"rerank must be None, 'superglobal' or 'cvnet', got {rerank!r}")
        return [[Hit(self.paths[int(j)], float(sim[int(j), i])) for j in ranks[:k, i]]
                for i in range(len(queries))]

    def _cvnet_rerank(self, model, queries, sim, ranks, topk, batch_size, bucket):
        candidates = rr.cvnet.blind_candidates(ranks, topk)
        scores = verify.verification_scores(
            model, [ImageRef(str(q)) for q in queries], [ImageRef(p) for p in self.paths],
            candidates, batch_size=batch_size, bucket=bucket)
        return rr.cvnet.blind(ranks, sim, scores, topk)


def index_folder(model: RetrievalModel, folder, family: str = "cvnet", *,
                 batch_size: int = 8, bucket: int = 64, workers: int = 4) -> Index:
    """Indexes every image under `folder` (see `list_images`)."""
    paths = list_images(folder)
    X = describe(model, paths, family, batch_size=batch_size, bucket=bucket, workers=workers,
                 desc=f"index {os.fspath(folder)}")
    return Index([str(p) for p in paths], X, family)


def result_grid(query, hits: Sequence[Hit], topn: int = 10, title: str = "") -> np.ndarray:
    """BGR uint8 image: the query (blue border) and its top hits with their scores."""
    return visuals.hits_row(read_image(ImageRef(str(query))),
                            [(read_image(ImageRef(h.path)), f"{h.score:.3f}")
                             for h in hits[:topn]], title)
