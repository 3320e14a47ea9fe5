"""The four retrieval pipelines of the official CVNet and SuperGlobal test scripts.

  cvnet_global        CVNet-Global (3 OpenCV scales), exact similarity, argsort.
  cvnet_rerank        cvnet_global's ranking, top-k reranked by sim + 0.5 x CVNet-Rerank
                      score; protocol "official" (label-aware, per E/M/H) or "blind".
  superglobal_global  SuperGlobal descriptor (ReLU+, R-GeM, GeM+, S-GeM, 3 scales).
  superglobal_rerank  superglobal_global's ranking refined by SuperGlobal reranking.

`evaluate(cfg, model, dataset)` runs the pipelines named in `cfg.pipelines` (the config
chooses the evaluators) and returns their metrics and rankings.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax.numpy as jnp
import numpy as np

from scvnet_jax import files, metrics, rerank
from scvnet_jax.api import RetrievalModel
from scvnet_jax.data.revisitop import RevisitopDataset, check_files_exist
from scvnet_jax.engine import extract, search, verify
from scvnet_jax.engine.cache import (BACKBONE, ChunkCache, content_digests, refs_fingerprint,
                                     weights_fingerprint)
from scvnet_jax.errors import ConfigError
from scvnet_jax.evaluation.config import PIPELINES
from scvnet_jax.images import ImageRef

NEEDS = {"cvnet_global": "cvnet", "cvnet_rerank": "cvnet", "superglobal_global": "superglobal",
         "superglobal_rerank": "superglobal"}
LABEL_FREE = "label-free"


@dataclasses.dataclass
class PipelineResult:
    name: str
    protocol: str                  # "official" / "blind" for cvnet_rerank, else "label-free"
    ranks: dict                    # {"": (n_db, n_q)} or {"E": .., "M": .., "H": ..}
    mAP: dict                      # {"E": float, "M": float, "H": float}
    mpk: dict                      # {"E": [..], "M": [..], "H": [..]}

    def ranking(self, setting: str = "M") -> np.ndarray:
        return self.ranks.get(setting, self.ranks.get(""))


@dataclasses.dataclass
class Context:
    """What the pipelines share: the model, the data, caches and extraction settings."""
    cfg: object
    model: RetrievalModel
    dataset: RevisitopDataset
    db_refs: list
    query_refs: list
    cache_key: dict                # what every cached value depends on, but the weights
    _desc: dict = dataclasses.field(default_factory=dict)
    _fingerprints: dict = dataclasses.field(default_factory=dict)
    _global: dict = dataclasses.field(default_factory=dict)

    def cache(self, kind: str, extra: dict, chunk_size: int, weights: str | None):
        """A cache for values that depend on the `weights` part (BACKBONE: descriptors and
        local features; None: the whole model, e.g. rerank scores)."""
        if not self.cfg.cache_dir:
            return None
        if weights not in self._fingerprints:
            self._fingerprints[weights] = weights_fingerprint(self.model.variables, weights)
        key = {**self.cache_key, **extra, "weights": self._fingerprints[weights],
               "weights_part": weights or "all"}
        return ChunkCache(self.cfg.cache_dir, kind, key, chunk_size)

    def content_fingerprint(self) -> str:
        """One digest of every database and query file's content (for caches of values that
        depend on many images, e.g. rerank scores)."""
        with ThreadPoolExecutor(self.cfg.workers) as pool:
            digests = content_digests(self.db_refs + self.query_refs, pool)
        return files.list_fingerprint(digests)

    def descriptors(self, family: str):
        """(X, Q) for 'cvnet' or 'superglobal', extracted once (and cached on disk)."""
        if family not in self._desc:
            spec = (extract.CVNetGlobal(tuple(self.cfg.cvnet.scales)) if family == "cvnet" else
                    extract.SuperGlobal(**dict(self.cfg.superglobal.descriptor)))
            out = []
            for split, refs in (("db", self.db_refs), ("query", self.query_refs)):
                cache = self.cache(f"{family}-{split}", {
                    "spec": repr(spec), "images": refs_fingerprint(refs)}, self.cfg.chunk_size,
                    BACKBONE)
                out.append(extract.extract(
                    self.model, refs, spec, batch_size=self.cfg.batch_size,
                    bucket=self.cfg.bucket, cache=cache, workers=self.cfg.workers,
                    desc=f"{family} {split}"))
            self._desc[family] = tuple(out)
        return self._desc[family]

    def global_search(self, family: str):
        """(sim (n_db, n_q) float32, ranks (n_db, n_q) int64) by exact search on the device."""
        if family not in self._global:
            self._global[family] = search.rank(*self.descriptors(family))
        return self._global[family]


def _result(ctx: Context, name: str, protocol: str, ranks) -> PipelineResult:
    per_setting = isinstance(ranks, tuple)
    mE, mM, mH, mpk = metrics.revisitop(ranks, ctx.dataset.gnd, ks=tuple(ctx.cfg.ks))
    settings = dict(zip(metrics.SETTINGS, ranks)) if per_setting else {"": ranks}
    return PipelineResult(name, protocol, settings, {"E": mE, "M": mM, "H": mH},
                          {s: [float(v) for v in row] for s, row in zip(metrics.SETTINGS, mpk)})


def cvnet_global(ctx: Context) -> PipelineResult:
    return _result(ctx, "cvnet_global", LABEL_FREE, ctx.global_search("cvnet")[1])


def cvnet_rerank(ctx: Context) -> PipelineResult:
    sim, ranks = ctx.global_search("cvnet")
    cfg = ctx.cfg.cvnet
    if cfg.protocol == "official":
        candidates = rerank.cvnet.official_candidates(ranks, ctx.dataset.gnd, cfg.topk)
    elif cfg.protocol == "blind":
        candidates = rerank.cvnet.blind_candidates(ranks, cfg.topk)
    else:
        raise ConfigError(f"cvnet.protocol must be 'official' or 'blind', got "
                          f"{cfg.protocol!r}")
    cache = ctx.cache("cvnet-scores", {"db": refs_fingerprint(ctx.db_refs),
                                       "query": refs_fingerprint(ctx.query_refs),
                                       "content": ctx.content_fingerprint()}, 1, None)
    scores = verify.verification_scores(
        ctx.model, ctx.query_refs, ctx.db_refs, candidates, batch_size=ctx.cfg.batch_size,
        bucket=ctx.cfg.bucket, feature_bucket=ctx.cfg.feature_bucket, cache=cache,
        workers=ctx.cfg.workers)
    if cfg.protocol == "official":
        out = rerank.cvnet.official(ranks, sim, scores, ctx.dataset.gnd, cfg.topk, cfg.mix)
    else:
        out = rerank.cvnet.blind(ranks, sim, scores, cfg.topk, cfg.mix)
    return _result(ctx, "cvnet_rerank", cfg.protocol, out)


def superglobal_global(ctx: Context) -> PipelineResult:
    return _result(ctx, "superglobal_global", LABEL_FREE, ctx.global_search("superglobal")[1])


def superglobal_rerank(ctx: Context) -> PipelineResult:
    X, Q = ctx.descriptors("superglobal")
    ranks = ctx.global_search("superglobal")[1]
    r = ctx.cfg.superglobal.rerank
    out = rerank.superglobal(jnp.asarray(X), jnp.asarray(Q), ranks, M=r.M, K=r.K, beta=r.beta)
    return _result(ctx, "superglobal_rerank", LABEL_FREE, out)


EVALUATORS: dict[str, Callable[[Context], PipelineResult]] = {
    "cvnet_global": cvnet_global, "cvnet_rerank": cvnet_rerank,
    "superglobal_global": superglobal_global, "superglobal_rerank": superglobal_rerank}


def evaluate(cfg, model: RetrievalModel, dataset: RevisitopDataset,
             distractors: list[ImageRef] | None = None) -> list[PipelineResult]:
    """Runs `cfg.pipelines` on `dataset` (+ distractors appended to the database)."""
    unknown = [p for p in cfg.pipelines if p not in EVALUATORS]
    if unknown:
        raise ConfigError(f"unknown pipeline(s) {unknown}; choose from {', '.join(PIPELINES)}")
    db_refs = dataset.db_images() + list(distractors or [])
    query_refs = dataset.query_images()
    check_files_exist(db_refs, "database")
    check_files_exist(query_refs, "query")
    extract.check_images(query_refs, cfg.workers)   # decodable, boxes inside: before any work
    m = model.module
    key = {"arch": m.arch.asdict(), "dtype": str(np.dtype(m.dtype)),
           "precision": str(m.precision), "dataset": dataset.name, "gnd": dataset.fingerprint()}
    ctx = Context(cfg, model, dataset, db_refs, query_refs, key)
    return [EVALUATORS[name](ctx) for name in cfg.pipelines]
