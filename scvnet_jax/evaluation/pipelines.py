"""The retrieval pipelines: the four of the official CVNet and SuperGlobal test scripts,

  cvnet_global        CVNet-Global (3 OpenCV scales), exact similarity, argsort.
  cvnet_rerank        cvnet_global's ranking, top-k reranked by sim + 0.5 x CVNet-Rerank
                      score; protocol "official" (label-aware, per E/M/H) or "blind".
  superglobal_global  SuperGlobal descriptor (ReLU+, R-GeM, GeM+, S-GeM, 3 scales).
  superglobal_rerank  superglobal_global's ranking refined by SuperGlobal reranking.

and the other rerankers of the registry (`scvnet_jax.rerank.registry`) on the global
ranking chosen by `cfg.rerank.first_stage` (cvnet_global or superglobal_global):

  icfrr, csa, alpha_qe, dba   (none of them looks at labels)
  ames                        (protocol "official" as the authors' evaluation, or "blind")

`evaluate(cfg, model, dataset)` runs the pipelines named in `cfg.pipelines` (the config
chooses the evaluators) and returns their metrics, rankings and reranking times.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from scvnet_jax import files, metrics
from scvnet_jax.api import RetrievalModel
from scvnet_jax.data.revisitop import RevisitopDataset, check_files_exist
from scvnet_jax.engine import extract, search
from scvnet_jax.engine.cache import (BACKBONE, ChunkCache, content_digests, refs_fingerprint,
                                     weights_fingerprint)
from scvnet_jax.errors import ConfigError
from scvnet_jax.evaluation.config import ALL_PIPELINES, RERANK_PIPELINES
from scvnet_jax.images import ImageRef
from scvnet_jax.rerank import registry

NEEDS = {"cvnet_global": "cvnet", "cvnet_rerank": "cvnet", "superglobal_global": "superglobal",
         "superglobal_rerank": "superglobal"}
LABEL_FREE = registry.LABEL_FREE


@dataclasses.dataclass
class PipelineResult:
    name: str
    protocol: str                  # "official" / "blind" for cvnet_rerank, else "label-free"
    ranks: dict                    # {"": (n_db, n_q)} or {"E": .., "M": .., "H": ..}
    mAP: dict                      # {"E": float, "M": float, "H": float}; other benchmarks:
                                   # their settings ({"all": ..}, {"public": .., "private": ..})
    mpk: dict                      # {"E": [..], "M": [..], "H": [..]} likewise
    info: dict = dataclasses.field(default_factory=dict)   # first_stage, rerank_ms_per_query
    aps: dict = dataclasses.field(default_factory=dict)    # {setting: (n_q,) AP; NaN: the
                                                           # query does not count in it}
    queries: list = dataclasses.field(default_factory=list)  # the queries' names
    classes: list | None = None                            # their classes (folder sets)

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


# Rows of each ranking kept in the results (and results_ranks.npz) per benchmark protocol:
# GLDv2 scores the top 100 of 761,757 index images for ~1.1k queries, and its full rankings
# would take ~7 GB per pipeline.
KEEP_ROWS = {"gldv2": 100}


def _result(ctx: Context, name: str, protocol: str, ranks, **info) -> PipelineResult:
    per_setting = isinstance(ranks, tuple)
    keep = KEEP_ROWS.get(ctx.dataset.protocol)
    if keep:
        # (copies: a view would keep the full ranking alive)
        ranks = (tuple(np.array(r[:keep]) for r in ranks) if per_setting else
                 np.array(ranks[:keep]))
    maps, mpk, aps = metrics.score_queries(ctx.dataset.protocol, ranks, ctx.dataset.gnd,
                                           tuple(ctx.cfg.ks))
    settings = dict(zip(metrics.SETTINGS, ranks)) if per_setting else {"": ranks}
    return PipelineResult(name, protocol, settings, maps, mpk, info, aps,
                          list(ctx.dataset.qimlist), ctx.dataset.query_classes)


def label_protocol(dataset: RevisitopDataset, protocol: str) -> str:
    """The CVNet / AMES rerank protocol to use: "official" needs revisitop's Easy/Hard/junk
    labels, so a benchmark without them (a folder set, GLDv2) is reranked "blind"."""
    return protocol if dataset.protocol == "revisitop" else "blind"


def _reranked(ctx: Context, name: str, reranker: str, first_stage: str, options: dict,
              **inputs) -> PipelineResult:
    """`reranker` (from the registry) on `first_stage`'s ranking, timed."""
    family = NEEDS[first_stage]
    X, Q = ctx.descriptors(family)
    sim, ranks = ctx.global_search(family)
    t0 = time.perf_counter()
    out = registry.rerank(reranker, registry.Inputs(X, Q, ranks, sim, **inputs), **options)
    ms = 1000 * (time.perf_counter() - t0) / max(len(Q), 1)
    return _result(ctx, name, out.protocol, out.ranks, first_stage=first_stage,
                   rerank_ms_per_query=round(ms, 3))


def cvnet_global(ctx: Context) -> PipelineResult:
    return _result(ctx, "cvnet_global", LABEL_FREE, ctx.global_search("cvnet")[1])


def cvnet_rerank(ctx: Context) -> PipelineResult:
    cfg = ctx.cfg
    cache = ctx.cache("cvnet-scores", {"db": refs_fingerprint(ctx.db_refs),
                                       "query": refs_fingerprint(ctx.query_refs),
                                       "content": ctx.content_fingerprint()}, 1, None)
    settings = {"batch_size": cfg.batch_size, "bucket": cfg.bucket,
                "feature_bucket": cfg.feature_bucket, "workers": cfg.workers, "cache": cache}
    return _reranked(ctx, "cvnet_rerank", "cvnet", "cvnet_global",
                     {"topk": cfg.cvnet.topk, "mix": cfg.cvnet.mix,
                      "protocol": label_protocol(ctx.dataset, cfg.cvnet.protocol)},
                     model=ctx.model, query_images=ctx.query_refs, db_images=ctx.db_refs,
                     gnd=ctx.dataset.gnd, settings=settings)


def superglobal_global(ctx: Context) -> PipelineResult:
    return _result(ctx, "superglobal_global", LABEL_FREE, ctx.global_search("superglobal")[1])


def superglobal_rerank(ctx: Context) -> PipelineResult:
    return _reranked(ctx, "superglobal_rerank", "superglobal", "superglobal_global",
                     dict(ctx.cfg.superglobal.rerank))


def ames(ctx: Context) -> PipelineResult:
    cfg = ctx.cfg
    settings = {"batch_size": cfg.batch_size, "bucket": cfg.bucket, "workers": cfg.workers,
                "cache_dir": cfg.cache_dir or None}
    options = {**dict(cfg.ames), "protocol": label_protocol(ctx.dataset, cfg.ames.protocol)}
    return _reranked(ctx, "ames", "ames", cfg.rerank.first_stage, options,
                     model=ctx.model, query_images=ctx.query_refs, db_images=ctx.db_refs,
                     gnd=ctx.dataset.gnd, settings=settings)


def chamfer(ctx: Context) -> PipelineResult:
    cfg = ctx.cfg
    settings = {"batch_size": cfg.batch_size, "bucket": cfg.bucket, "workers": cfg.workers,
                "cache_dir": cfg.cache_dir or None}
    options = {**dict(cfg.chamfer), "protocol": label_protocol(ctx.dataset,
                                                               cfg.chamfer.protocol)}
    return _reranked(ctx, "chamfer", "chamfer", cfg.rerank.first_stage, options,
                     model=ctx.model, query_images=ctx.query_refs, db_images=ctx.db_refs,
                     gnd=ctx.dataset.gnd, settings=settings)


def _registry_pipeline(name: str) -> Callable[[Context], PipelineResult]:
    def run(ctx: Context) -> PipelineResult:
        return _reranked(ctx, name, name, ctx.cfg.rerank.first_stage, dict(ctx.cfg[name]))
    run.__name__ = name
    return run


EVALUATORS: dict[str, Callable[[Context], PipelineResult]] = {
    "cvnet_global": cvnet_global, "cvnet_rerank": cvnet_rerank,
    "superglobal_global": superglobal_global, "superglobal_rerank": superglobal_rerank,
    **{name: _registry_pipeline(name) for name in RERANK_PIPELINES}, "ames": ames,
    "chamfer": chamfer}


def open_dataset(name: str, data_dir, cache_dir) -> RevisitopDataset:
    """The benchmark `name`: folder:<data_dir>/<name> (its held-out images written once
    under `cache_dir`), gldv2_retrieval or a revisitop dataset (demo, roxford5k, rparis6k)
    in `data_dir`."""
    if name.startswith("folder:"):
        from scvnet_jax.data import folder
        return folder.open_benchmark(name, cache_dir)
    if name == "gldv2_retrieval":
        from scvnet_jax.data import gldv2_retrieval
        return gldv2_retrieval.load(data_dir)
    from scvnet_jax.data.revisitop import load_dataset
    return load_dataset(data_dir, name)


def evaluate(cfg, model: RetrievalModel, dataset: RevisitopDataset,
             distractors: list[ImageRef] | None = None) -> list[PipelineResult]:
    """Runs `cfg.pipelines` on `dataset` (+ distractors appended to the database)."""
    unknown = [p for p in cfg.pipelines if p not in EVALUATORS]
    if unknown:
        raise ConfigError(f"unknown pipeline(s) {unknown}; choose from "
                          f"{', '.join(ALL_PIPELINES)}")
    db_refs = dataset.db_images() + list(distractors or [])
    query_refs = dataset.query_images()
    check_files_exist(db_refs, "database")
    check_files_exist(query_refs, "query")
    extract.check_images(query_refs, cfg.workers)   # decodable, boxes inside: before any work
    if "csa" in cfg.pipelines:                      # a CSA, readable: before any work too
        registry.csa_model(cfg.csa.weights, cfg.csa.dtype)
    if "ames" in cfg.pipelines:                     # AMES and its detector likewise
        registry.ames_setup(cfg.ames.weights, cfg.ames.detector)
    m = model.module
    key = {"arch": m.arch.asdict(), "dtype": str(np.dtype(m.dtype)),
           "precision": str(m.precision), "dataset": dataset.name, "gnd": dataset.fingerprint()}
    ctx = Context(cfg, model, dataset, db_refs, query_refs, key)
    return [EVALUATORS[name](ctx) for name in cfg.pipelines]
