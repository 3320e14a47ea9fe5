"""The retrieval pipelines: the global ones (exact similarity, argsort),

  cvnet_global        CVNet-Global (3 OpenCV scales).
  superglobal_global  SuperGlobal descriptor (ReLU+, R-GeM, GeM+, S-GeM, 3 scales).

and one per reranker of the registry (`scvnet_jax.rerank.registry`): those of the official
CVNet and SuperGlobal test scripts on their own first stage (cvnet_rerank,
superglobal_rerank), the others on the global ranking chosen by `cfg.rerank.first_stage`,
each with the options of its config section. A reranker whose `needs` include "labels"
reranks by its protocol "official" (label-aware, as the authors' evaluation) on revisitop
benchmarks, "blind" (the plain top k) elsewhere.

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
from scvnet_jax.evaluation.config import all_pipelines, reranker_of, reranker_options
from scvnet_jax.images import ImageRef
from scvnet_jax.rerank import registry

# the descriptor family of each global pipeline
FAMILY_OF = {"cvnet_global": "cvnet", "superglobal_global": "superglobal"}
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
    prepared: dict = dataclasses.field(default_factory=dict)   # pipeline -> its options,
                                                               # prepared (weights loaded)
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

    def scores_cache(self, kind: str, extra: dict | None = None):
        """A cache of rerank scores of every (query, database image) pair (their files'
        content in its key, and `extra`: what else the scores depend on), for a reranker
        that reads the images (e.g. "cvnet-scores")."""
        return self.cache(kind, {"db": refs_fingerprint(self.db_refs),
                                 "query": refs_fingerprint(self.query_refs),
                                 "content": self.content_fingerprint(), **(extra or {})},
                          1, None)

    def descriptors(self, family: str):
        """(X, Q) for 'cvnet' or 'superglobal', extracted once (and cached on disk)."""
        if family not in self._desc:
            spec = (extract.CVNetGlobal(tuple(self.cfg.cvnet.scales)) if family == "cvnet" else
                    extract.SuperGlobal(**dict(self.cfg.superglobal.descriptor)))
            def run(split, refs):
                cache = self.cache(f"{family}-{split}", {
                    "spec": repr(spec), "images": refs_fingerprint(refs)}, self.cfg.chunk_size,
                    BACKBONE)
                return extract.extract(
                    self.model, refs, spec, batch_size=self.cfg.batch_size,
                    bucket=self.cfg.bucket, cache=cache, workers=self.cfg.workers,
                    desc=f"{family} {split}")

            X = run("db", self.db_refs)
            # a query that is a database image (same file, no crop box: a folder set's
            # leave-one-out queries) has that image's descriptor; the rest are extracted
            in_db = {r: i for i, r in enumerate(self.db_refs) if r.bbx is None}
            rows = [in_db.get(r) for r in self.query_refs]
            rest = [q for q, d in enumerate(rows) if d is None]
            Q = np.zeros((len(self.query_refs), X.shape[1]), X.dtype)
            Q[[q for q, d in enumerate(rows) if d is not None]] = X[[d for d in rows
                                                                     if d is not None]]
            if rest:
                Q[rest] = run("query", [self.query_refs[q] for q in rest])
            self._desc[family] = (X, Q)
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


def _reranked(ctx: Context, name: str) -> PipelineResult:
    """Pipeline `name`: its reranker (from the registry) on its first stage's ranking, with
    the options of its config section, timed."""
    cfg, r = ctx.cfg, reranker_of(name)
    first_stage = r.first_stage or cfg.rerank.first_stage
    family = FAMILY_OF[first_stage]
    X, Q = ctx.descriptors(family)
    sim, ranks = ctx.global_search(family)
    options = ctx.prepared[name]
    if "protocol" in options:
        options = {**options, "protocol": label_protocol(ctx.dataset, options["protocol"])}
    inputs = {}
    if r.needs_images:
        inputs = dict(model=ctx.model, query_images=ctx.query_refs, db_images=ctx.db_refs,
                      settings={"batch_size": cfg.batch_size, "bucket": cfg.bucket,
                                "feature_bucket": cfg.feature_bucket, "workers": cfg.workers,
                                "cache_dir": cfg.cache_dir or None,
                                "scores_cache": ctx.scores_cache})
    if "labels" in r.needs:
        inputs["gnd"] = ctx.dataset.gnd
    t0 = time.perf_counter()
    out = registry.rerank(r.name, registry.Inputs(X, Q, ranks, sim, **inputs), **options)
    ms = 1000 * (time.perf_counter() - t0) / max(len(Q), 1)
    ranked = (tuple(out.per_setting[s] for s in metrics.SETTINGS) if out.per_setting else
              out.ranks)
    return _result(ctx, name, out.protocol, ranked, first_stage=first_stage,
                   rerank_ms_per_query=round(ms, 3))


def cvnet_global(ctx: Context) -> PipelineResult:
    return _result(ctx, "cvnet_global", LABEL_FREE, ctx.global_search("cvnet")[1])


def superglobal_global(ctx: Context) -> PipelineResult:
    return _result(ctx, "superglobal_global", LABEL_FREE, ctx.global_search("superglobal")[1])


GLOBAL = {"cvnet_global": cvnet_global, "superglobal_global": superglobal_global}


def evaluator(name: str) -> Callable[[Context], PipelineResult]:
    """The function that runs pipeline `name` (a global one, or a reranker's)."""
    if name in GLOBAL:
        return GLOBAL[name]
    if reranker_of(name) is None:
        raise ConfigError(f"unknown pipeline {name!r}; choose from "
                          f"{', '.join(all_pipelines())}")
    return lambda ctx: _reranked(ctx, name)


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
    unknown = [p for p in cfg.pipelines if p not in all_pipelines()]
    if unknown:
        raise ConfigError(f"unknown pipeline(s) {unknown}; choose from "
                          f"{', '.join(all_pipelines())}")
    db_refs = dataset.db_images() + list(distractors or [])
    query_refs = dataset.query_images()
    check_files_exist(db_refs, "database")
    check_files_exist(query_refs, "query")
    extract.check_images(query_refs, cfg.workers)   # decodable, boxes inside: before any work
    prepared = {}                    # each reranker's weights loaded: before any work too
    for name in cfg.pipelines:
        r = reranker_of(name)
        if r is not None:
            prepared[name] = registry.prepare(r.name, registry.options(
                r.name, reranker_options(cfg, r)))
    m = model.module
    key = {"arch": m.arch.asdict(), "dtype": str(np.dtype(m.dtype)),
           "precision": str(m.precision), "dataset": dataset.name, "gnd": dataset.fingerprint()}
    ctx = Context(cfg, model, dataset, db_refs, query_refs, key, prepared)
    return [evaluator(name)(ctx) for name in cfg.pipelines]
