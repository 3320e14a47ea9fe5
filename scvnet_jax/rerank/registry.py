"""The one registry of rerankers: eval.py's pipelines, config sections, flags and --help,
`sj.search`, `scvnet-search` (query --rerank, serve's weights flags), the REST API and the
page's menu all come from here; no other module names a reranker.

    from scvnet_jax.rerank import registry
    registry.names()                                   # every reranker
    out = registry.rerank("alpha_qe", registry.Inputs(X, Q, ranks), k=2, alpha=3.0)
    out.ranks, out.scores                              # (N, nq) int64, and what they are sorted by

Every reranker takes a first-stage ranking (`ranks` (N, nq), best first) with the
descriptors it came from (`X` (N, D), `Q` (nq, D), L2-normalised); those that read the
images again also get the model and the images. A reranker returns a Result: the new
ranking, always one (N, nq) int64 array, and the scores its first rows are sorted by
(`Result.scores` (n, nq), descending; n = what it reranked); a protocol that ranks each
revisitop setting apart adds them in `Result.per_setting`.

Adding one is one entry, at import time or at run time:

    registry.register(registry.Reranker(
        "mine", "what it does", (registry.Option("k", 10, int, "an integer >= 1",
                                                 lambda v: v >= 1),),
        run=lambda inputs, k: registry.Result(...), depth="k", score="what the scores are"))

It is then eval.py's pipeline "mine" (--config.mine.k=...), `search(..., rerank="mine")`,
`scvnet-search query --rerank mine` and in the server's menu. An entry declares its options
(real defaults; None only where `Option.unset` says what it means, e.g. "the model's own"),
what it needs (NEEDS: global descriptors, images, local descriptors, weights, labels), its
preparation step (weights loaded and checked before any work) and its depth.

| name        | what                                                      | labels |
|-------------|-----------------------------------------------------------|--------|
| superglobal | SuperGlobal reranking (MDescAug + RerankwMDA), top M      | never  |
| cvnet       | sim + mix x CVNet verification score, top k               | protocol "official" uses them (as the official test); "blind" never |
| icfrr       | Iterative Cluster-Free Re-Ranking of the whole ranking    | never  |
| csa         | CSA transformer over affinity features, top k             | never  |
| alpha_qe    | alpha-weighted query expansion, whole database re-ranked  | never  |
| dba         | alpha-weighted database augmentation, then search         | never  |
| ames        | lamb x sim + (1 - lamb) x sigmoid(temp x AMES logit), top k | protocol "official" uses them (the authors' evaluate()); "blind" never |
| chamfer     | lamb x sim + (1 - lamb) x mean best local cosine, top k   | as ames |
| spatial     | inliers of a homography (or F) over mutual local NNs, top k | as ames |
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from scvnet_jax.errors import ConfigError

LABEL_FREE = "label-free"


@dataclasses.dataclass
class Inputs:
    """What a reranker may use. X, Q, ranks are always given; sim (N, nq) is the first
    stage's similarity (computed from X and Q when missing); model and the image lists
    (ImageRef) are the CVNet verifier's; gnd (revisitop ground truth) only its official
    protocol's; settings: extraction settings for image-based rerankers (batch_size, bucket,
    feature_bucket, workers, cache)."""
    X: np.ndarray
    Q: np.ndarray
    ranks: np.ndarray
    sim: np.ndarray | None = None
    model: Any = None
    query_images: Sequence | None = None
    db_images: Sequence | None = None
    gnd: Sequence | None = None
    settings: Mapping = dataclasses.field(default_factory=dict)

    def similarity(self) -> np.ndarray:
        if self.sim is None:
            from scvnet_jax.engine import search
            self.sim = search.rank(self.X, self.Q)[0]
        return self.sim


@dataclasses.dataclass
class Result:
    """ranks: (N, nq) int64, the new ranking (for the official protocol of the CVNet, AMES
    and chamfer rerankers: the Medium setting's); per_setting: {"E", "M", "H"} -> (N, nq)
    int64 rankings where the protocol ranks each revisitop setting apart, else {};
    scores: (n, nq) float32, what the first n rows of `ranks` are sorted by (None for
    the per-setting protocols); protocol: "label-free", or the reranker's protocol."""
    ranks: np.ndarray
    scores: np.ndarray | None
    protocol: str = LABEL_FREE
    per_setting: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.ranks = np.asarray(self.ranks, np.int64)
        self.per_setting = {s: np.asarray(r, np.int64) for s, r in self.per_setting.items()}
        if self.scores is not None:
            self.scores = np.asarray(self.scores, np.float32)


def _per_setting(e, m, h, protocol: str) -> Result:
    return Result(m, None, protocol, {"E": e, "M": m, "H": h})


# What a reranker needs (Reranker.needs): the first stage's global descriptors (every one),
# the query and database images again, their local descriptors, weights of its own, and the
# ground-truth labels (only its "official" protocol reads them; "blind" never).
NEEDS = ("global", "images", "local", "weights", "labels")


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a reranker. default: its value when not given (None only where
    `unset` says what None means, e.g. "the model's own"); kind: int, float, bool or str
    (str options also take a loaded object, e.g. a model); path: a file or folder that must
    exist (weights, a detector checkpoint); valid / expected: its range, and
    that range in words; choices: the values allowed (str options); flag: the command-line
    flag (eval.py, `scvnet-search serve`) that sets it; benchmark: eval.py's default where
    it differs (the official protocol on labelled benchmarks); help: one line."""
    name: str
    default: Any
    kind: type = int
    expected: str = ""
    valid: Callable[[Any], bool] = lambda v: True
    choices: tuple = ()
    unset: str = ""
    flag: str = ""
    path: bool = False
    benchmark: Any = "same"
    help: str = ""

    @property
    def eval_default(self):
        return self.default if self.benchmark == "same" else self.benchmark

    def describe(self) -> str:
        what = self.expected or (f"one of {', '.join(map(repr, self.choices))}" if self.choices
                                 else {int: "an integer", float: "a number", bool: "a bool",
                                       str: "a string"}[self.kind])
        return what + (f" (None = {self.unset})" if self.unset else "")

    def problem(self, value) -> str:
        """'' if `value` fits, else what was expected."""
        if value is None and self.unset:
            return ""
        k = self.kind
        if k is bool:
            ok = isinstance(value, (bool, np.bool_))
        elif k is int:
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        elif k is float:
            ok = (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
                  and math.isfinite(float(value)))
        else:
            ok = not self.choices or value in self.choices
        if ok and k is not str:
            ok = bool(self.valid(value))
        return "" if ok else self.describe()


@dataclasses.dataclass(frozen=True)
class Reranker:
    """One reranker: everything eval.py, `sj.search`, `scvnet-search` and the app know of it.

    options: its Options; `run(inputs, **options) -> Result`; needs: a subset of NEEDS;
    score: what Result.scores mean; prepare(options) -> options: what runs before any work
    (loads and checks the weights and files the options name; the options may then hold the
    loaded objects); depth: the option saying how many of the first stage's top it
    re-scores (`search`'s rerank_k sets it unless `depth_from_rerank_k` is False; where
    `every_hit`, its scores are on a scale of their own, so the depth is raised to cover
    every hit shown). eval.py: `pipeline` (default: its name) runs it on the ranking of
    `first_stage` (default: config.rerank.first_stage), with the options in config section
    `section` (default: its name); note(options, n_db) -> a line when a setting cannot be
    followed as given."""
    name: str
    summary: str
    options: tuple
    run: Callable[..., Result]
    needs: frozenset = frozenset({"global"})
    score: str = ""
    prepare: Callable[[dict], dict] | None = None
    depth: str = ""
    depth_from_rerank_k: bool = True
    every_hit: bool = False
    pipeline: str = ""
    first_stage: str = ""
    section: str = ""
    note: Callable[[Mapping, int], str] | None = None

    def __post_init__(self):
        unknown = set(self.needs) - set(NEEDS)
        if unknown or "global" not in self.needs:
            raise ConfigError(f"reranker {self.name}: needs {sorted(self.needs)}: expected "
                              f"'global' and any of {', '.join(NEEDS)}")
        names = [o.name for o in self.options]
        if "weights" in self.needs and "weights" not in names:
            raise ConfigError(f"reranker {self.name} needs weights: declare option 'weights'")
        if self.depth and self.depth not in names:
            raise ConfigError(f"reranker {self.name}: depth {self.depth!r} is not an option")
        object.__setattr__(self, "needs", frozenset(self.needs))
        object.__setattr__(self, "pipeline", self.pipeline or self.name)
        object.__setattr__(self, "section", self.section or self.name)

    @property
    def defaults(self) -> dict:
        return {o.name: o.default for o in self.options}

    def option(self, name: str) -> Option:
        return next(o for o in self.options if o.name == name)

    @property
    def needs_images(self) -> bool:      # reads the query and database images again
        return "images" in self.needs

    @property
    def needs_weights(self) -> bool:     # a trained model of its own: option "weights"
        return "weights" in self.needs


def _sorted_scores(sim_cols: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    return np.take_along_axis(sim_cols, ranks, axis=0).astype(np.float32)


def _superglobal(inp: Inputs, M: int, K: int, beta: float) -> Result:
    from scvnet_jax.rerank.superglobal import superglobal
    ranks, scores = superglobal(inp.X, inp.Q, inp.ranks, M=M, K=K, beta=beta,
                                return_scores=True)
    return Result(ranks, scores)


def _cvnet(inp: Inputs, topk: int, mix: float, protocol: str,
           max_side: int | None = None) -> Result:
    from scvnet_jax.engine import verify
    from scvnet_jax.rerank import cvnet
    if inp.model is None or inp.query_images is None or inp.db_images is None:
        raise ConfigError("the cvnet reranker verifies images: it needs the model and the "
                          "query and database images")
    if protocol == "official":
        if inp.gnd is None:
            raise ConfigError("cvnet protocol 'official' needs ground truth; use 'blind' on "
                              "data without labels")
        candidates = cvnet.official_candidates(inp.ranks, inp.gnd, topk)
    elif protocol == "blind":
        candidates = cvnet.blind_candidates(inp.ranks, topk)
    else:
        raise ConfigError(f"cvnet protocol must be 'official' or 'blind', got {protocol!r}")
    s = dict(inp.settings)
    cache = s.get("cache")
    if cache is None and s.get("scores_cache") is not None:   # eval.py's, made when needed
        # scores at another verifier size are other values ("verifier_max_side": the
        # cache's own "max_side" is the images' working size)
        cache = s["scores_cache"]("cvnet-scores",
                                  {"verifier_max_side": max_side} if max_side else {})
    scores = verify.verification_scores(
        inp.model, inp.query_images, inp.db_images, candidates,
        batch_size=s.get("batch_size", 0), bucket=s.get("bucket", 64),
        feature_bucket=s.get("feature_bucket", 4), cache=cache,
        workers=s.get("workers", 4), max_side=max_side or 0)
    sim = inp.similarity()
    mixed = np.array(sim, np.float32)
    has = ~np.isnan(scores)
    mixed[has] += mix * scores[has]
    if protocol == "official":
        return _per_setting(*cvnet.official(inp.ranks, sim, scores, inp.gnd, topk, mix),
                            protocol)
    ranks = cvnet.blind(inp.ranks, sim, scores, topk, mix)
    return Result(ranks, _sorted_scores(mixed, ranks[:topk]), protocol)


def distances(A, B) -> np.ndarray:
    """Euclidean distances of L2-normalised rows, sqrt(max(2 - 2 a.b, 0)) (what ICFRR's
    official pipeline feeds it: torch.cdist of normalised features)."""
    from scvnet_jax.engine import search
    sim = search.rank(B, A)[0].T            # (len(A), len(B))
    return np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0)).astype(np.float32)


def _icfrr(inp: Inputs, KG: int, KQ: int, beta: float, n_times: int,
           limited_memory: bool, shortlist: int, max_bytes: int) -> Result:
    from scvnet_jax.rerank.icfrr import icfrr
    X = np.asarray(inp.X, np.float32)
    ranks, scores = icfrr(distances(inp.Q, X), distances(X, X), KG=KG, KQ=KQ, beta=beta,
                          n_times=n_times, limited_memory=limited_memory,
                          shortlist=shortlist, max_bytes=max_bytes,
                          return_scores=True)
    return Result(ranks, scores)


_LOADED: dict = {}       # (kind, path, ...) -> a reranker model, loaded once per process


def _load_once(key: tuple, load):
    if key not in _LOADED:
        _LOADED[key] = load()
    return _LOADED[key]


def csa_model(weights, dtype: str = "float32"):
    """The CSA model of `weights` (a CSA object, a model directory or an official
    checkpoint), loaded once per process."""
    from scvnet_jax.rerank import csa
    if isinstance(weights, csa.CSAReranker):
        return weights
    if not weights:
        raise ConfigError("the csa reranker needs weights: a CSA model directory (train.py "
                          "--config configs/csa_demo.py writes one) or an official "
                          "checkpoint (--csa_weights / csa.weights)")
    return _load_once(("csa", str(weights), dtype), lambda: csa.load(weights, dtype=dtype))


def _csa_prepare(opts: dict) -> dict:
    """The CSA model loaded (once per process); topk None: the one it was trained with."""
    model = csa_model(opts["weights"], opts["dtype"])
    return {**opts, "weights": model,
            "topk": model.topk if opts["topk"] is None else opts["topk"]}


def _csa(inp: Inputs, weights, topk: int | None, dtype: str) -> Result:
    model = csa_model(weights, dtype)
    if topk is None:        # the topk the model was trained with, else the official 128
        topk = model.topk or 128
    ranks, scores = model.rerank(inp.X, inp.Q, inp.ranks, topk=topk, return_scores=True)
    return Result(ranks, scores.astype(np.float32))


def ames_model(weights, dtype: str = "float32"):
    """The AMES model of `weights` (an AMES object, a model directory or an official
    checkpoint), loaded once per process."""
    from scvnet_jax.rerank import ames
    if isinstance(weights, ames.AMESReranker):
        return weights
    if not weights:
        raise ConfigError("the ames reranker needs weights: an AMES model directory (train.py "
                          "--config configs/ames_demo.py writes one) or an official "
                          "checkpoint (--ames_weights / ames.weights)")
    return _load_once(("ames", str(weights), dtype), lambda: ames.load(weights, dtype=dtype))


def ames_detector(path):
    """The AMES detector of `path` (loaded once per process); None for '' / None."""
    if not path:
        return None
    if not isinstance(path, (str, bytes)) and not hasattr(path, "__fspath__"):
        return path                              # a Detector already
    from scvnet_jax.engine.local import load_detector
    return _load_once(("detector", str(path)), lambda: load_detector(path))


def ames_setup(weights, detector=""):
    """(AMES model, detector or None) for the ames reranker, checked before any work: the
    official CVNet AMES weights read the detector's descriptors, so they need it (a model
    directory of ours records whether it was trained with one)."""
    from scvnet_jax.rerank import ames
    model = ames_model(weights)
    det = ames_detector(detector or ames.settings_of(model)["detector"])
    if det is None and not model.meta:
        raise ConfigError(f"ames: {weights} holds official AMES weights, which read the "
                          "detector's local descriptors: give the official detector "
                          "checkpoint too (--ames_detector / the 'detector' option)")
    return model, det


def _ames_prepare(opts: dict) -> dict:
    model, det = ames_setup(opts["weights"], opts["detector"])
    return {**opts, "weights": model, "detector": det or ""}


def _ames(inp: Inputs, weights, detector, k: int | None, lamb: float | None,
          temp: float | None, mix: float | None, query_len: int | None, db_len: int | None,
          protocol: str, batch_size: int) -> Result:
    from scvnet_jax.rerank import ames
    if inp.model is None or inp.query_images is None or inp.db_images is None:
        raise ConfigError("the ames reranker reads local descriptors: it needs the model and "
                          "the query and database images")
    model, det = ames_setup(weights, detector)
    sim = inp.similarity()
    ranks = np.asarray(inp.ranks)
    s = dict(inp.settings)
    out = ames.rerank_images(
        model, inp.model, inp.query_images, inp.db_images, ranks,
        np.take_along_axis(np.asarray(sim, np.float32), ranks, axis=0), detector=det,
        k=k, lamb=lamb, temp=temp, mix=mix, query_len=query_len, db_len=db_len,
        protocol=protocol,
        gnd=inp.gnd, cache_dir=s.get("cache_dir"),
        batch_size=batch_size, extract_batch_size=s.get("batch_size", 0),
        bucket=s.get("bucket", 64), workers=s.get("workers", 4))
    if protocol == "official":      # Easy and Medium from the medium run, as the authors
        return _per_setting(out["medium"][0], out["medium"][0], out["hard"][0], protocol)
    return Result(*out[""], protocol)


def _local_prepare(opts: dict) -> dict:
    return {**opts, "detector": ames_detector(opts["detector"]) or ""}


def _local_rerank(name: str, rerank_images, inp: Inputs, detector, protocol: str,
                  batch_size: int, **options) -> Result:
    """A reranker over local descriptors of image files (chamfer, spatial): its
    `rerank_images` on the first stage's top candidates, with eval.py's/search's settings
    (cache, extraction batch and buckets, workers)."""
    if inp.model is None or inp.query_images is None or inp.db_images is None:
        raise ConfigError(f"the {name} reranker reads local descriptors: it needs the model "
                          "and the query and database images")
    sim = inp.similarity()
    ranks = np.asarray(inp.ranks)
    s = dict(inp.settings)
    out = rerank_images(
        inp.model, inp.query_images, inp.db_images, ranks,
        np.take_along_axis(np.asarray(sim, np.float32), ranks, axis=0),
        detector=ames_detector(detector), protocol=protocol, gnd=inp.gnd,
        cache_dir=s.get("cache_dir"), batch_size=batch_size,
        extract_batch_size=s.get("batch_size", 0), bucket=s.get("bucket", 64),
        workers=s.get("workers", 4), **options)
    if protocol == "official":      # Easy and Medium from the medium run, as ames
        return _per_setting(out["medium"][0], out["medium"][0], out["hard"][0], protocol)
    return Result(*out[""], protocol)


def _chamfer(inp: Inputs, detector, k: int, lamb: float, query_len: int, db_len: int,
             bits: bool, protocol: str, batch_size: int) -> Result:
    from scvnet_jax.rerank import chamfer
    return _local_rerank("chamfer", chamfer.rerank_images, inp, detector, protocol,
                         batch_size, k=k, lamb=lamb, query_len=query_len, db_len=db_len,
                         bits=bits)


def _spatial(inp: Inputs, detector, k: int, query_len: int, db_len: int, method: str,
             threshold: float, protocol: str, batch_size: int) -> Result:
    from scvnet_jax.rerank import spatial
    return _local_rerank("spatial", spatial.rerank_images, inp, detector, protocol,
                         batch_size, k=k, query_len=query_len, db_len=db_len, method=method,
                         threshold=float(threshold))


def _alpha_qe(inp: Inputs, k: int, alpha: float) -> Result:
    from scvnet_jax.engine import search
    from scvnet_jax.rerank.expansion import expand_queries
    sim, ranks = search.rank(inp.X, expand_queries(inp.X, inp.Q, inp.ranks, k, alpha))
    return Result(ranks, _sorted_scores(sim, ranks))


def _dba(inp: Inputs, k: int, alpha: float) -> Result:
    from scvnet_jax.engine import search
    from scvnet_jax.rerank.expansion import dba
    sim, ranks = search.rank(dba(inp.X, k, alpha), inp.Q)
    return Result(ranks, _sorted_scores(sim, ranks))


def _icfrr_note(opts: Mapping, n_db: int) -> str:
    """ICFRR's KG / KQ above the gallery size are clipped: said."""
    from scvnet_jax.rerank.icfrr import clipped
    g = min(n_db, opts["shortlist"]) if opts["shortlist"] else n_db
    note = clipped(opts["KG"], opts["KQ"], g)[2]
    return note + (f" (the shortlist of {g})" if opts["shortlist"] and note else "")


def _at_least(n):
    return lambda v: v >= n


_PROTOCOL = dict(choices=("official", "blind"), benchmark="official",
                 help="official: as the authors' evaluation (needs revisitop's labels); "
                      "blind: the plain top k")
_WEIGHTS_HELP = ("weights (a model directory written by train.py, configs/{0}_demo.py, or an "
                 "official checkpoint)")
_DETECTOR = Option("detector", "", str, path=True, help="the official AMES detector checkpoint ('': "
                   "none; the model's own stage-3 features)")

RERANKERS: dict[str, Reranker] = {}


def register(reranker: Reranker) -> Reranker:
    """Adds `reranker` (replacing one of its name): eval.py's pipelines and flags,
    `sj.search`, `scvnet-search` and the app offer it from then on."""
    RERANKERS[reranker.name] = reranker
    return reranker


def unregister(name: str) -> None:
    RERANKERS.pop(name, None)


for _r in (
    Reranker("superglobal", "SuperGlobal reranking (MDescAug + RerankwMDA) of the top M", (
        Option("M", 400, int, "an integer >= 1", _at_least(1)),
        Option("K", 9, int, "an integer >= 1", _at_least(1)),
        Option("beta", 0.15, float, "a number >= 0", _at_least(0))),
        _superglobal, depth="M", depth_from_rerank_k=False, every_hit=True,
        pipeline="superglobal_rerank", first_stage="superglobal_global",
        section="superglobal.rerank",
        score="(similarity to the query + to the expanded query) / 2, augmented "
              "descriptors; top M"),
    Reranker("cvnet", "CVNet-Rerank: similarity + mix x verification score of the top k", (
        Option("topk", 100, int, "an integer >= 1 (images reranked)", _at_least(1),
               flag="topk", help="CVNet rerank depth"),
        Option("mix", 0.5, float, "a number >= 0", _at_least(0)),
        Option("protocol", "blind", str, **_PROTOCOL),
        Option("max_side", None, int, "an integer >= 1 (pixels)", _at_least(1),
               unset="the images' working size, as the global descriptors",
               help="the verifier's working size: a head trained on small views "
                    "(configs/demo_rerank.py: 160 px) verifies large photos best at it")),
        _cvnet, needs={"global", "images", "labels"}, depth="topk", pipeline="cvnet_rerank",
        first_stage="cvnet_global", section="cvnet",
        score="similarity + mix x verification score in [0, 1]; top k"),
    Reranker("icfrr", "ICFRR: iterative cluster-free re-ranking of the whole ranking", (
        Option("KG", 256, int, "an integer >= 1", _at_least(1)),
        Option("KQ", 250, int, "an integer >= 1", _at_least(1)),
        Option("beta", 0.5, float, "a number"),
        Option("n_times", 5, int, "an integer >= 0", _at_least(0)),
        Option("limited_memory", False, bool),
        Option("shortlist", None, int, "an integer >= 1", _at_least(1),
               unset="the whole gallery, the official method"),
        Option("max_bytes", None, int, "an integer >= 1", _at_least(1),
               unset="4 GiB, or SCVNET_ICFRR_MAX_BYTES")),
        _icfrr, note=_icfrr_note,
        score="-distance + beta x votes of the last iteration; every item"),
    Reranker("csa", "CSA: a transformer over affinity features re-orders the top k", (
        Option("weights", "", str, path=True, flag="csa_weights", help="CSA " + _WEIGHTS_HELP.format("csa")),
        Option("topk", None, int, "an integer >= 1", _at_least(1),
               unset="the topk the model was trained with, 128 for official checkpoints"),
        Option("dtype", "float32", str, choices=("float32", "float64"))),
        _csa, needs={"global", "weights"}, prepare=_csa_prepare, depth="topk", every_hit=True,
        score="cosine of the candidate's and the query's CSA output tokens; top k"),
    Reranker("alpha_qe", "alpha-weighted query expansion, the whole database re-ranked", (
        Option("k", 2, int, "an integer >= 0", _at_least(0)),
        Option("alpha", 3.0, float, "a number >= 0", _at_least(0))),
        _alpha_qe, score="similarity to the expanded query; every item"),
    Reranker("dba", "alpha-weighted database augmentation, then exact search", (
        Option("k", 2, int, "an integer >= 0", _at_least(0)),
        Option("alpha", 3.0, float, "a number >= 0", _at_least(0))),
        _dba, score="similarity of the query to the augmented descriptor; every item"),
    Reranker("ames", "AMES: a transformer over local descriptors scores the top k", (
        Option("weights", "", str, path=True, flag="ames_weights",
               help="AMES " + _WEIGHTS_HELP.format("ames")),
        dataclasses.replace(_DETECTOR, flag="ames_detector", help="the official AMES "
                            "detector checkpoint (for official AMES weights; our model "
                            "directories record their own choice)"),
        Option("k", None, int, "an integer >= 1 (images reranked)", _at_least(1),
               unset="the model's: 100 for official weights"),
        Option("lamb", None, float, "a number in [0, 1]", lambda v: 0 <= v <= 1,
               unset="the model's: the authors' 0.85 (binarized 0.65) for official weights"),
        Option("temp", None, float, "a number > 0", lambda v: v > 0,
               unset="the model's: the authors' 0.8 (binarized 0.2) for official weights"),
        Option("mix", None, float, "a number in [0, 1]", lambda v: 0 <= v <= 1,
               unset="the model's: 0 (the official scoring) unless it records one",
               help="the chamfer score's share of the local part: lamb x sim + (1 - lamb) "
                    "x (mix x chamfer + (1 - mix) x sigmoid(temp x logit))"),
        Option("query_len", None, int, "an integer >= 1", _at_least(1),
               unset="the model's: 600 for official weights"),
        Option("db_len", None, int, "an integer >= 1", _at_least(1),
               unset="the model's: 50 for official weights"),
        Option("protocol", "blind", str, **_PROTOCOL),
        Option("batch_size", 64, int, "an integer >= 1 (pairs per call)", _at_least(1))),
        _ames, needs={"global", "images", "local", "weights", "labels"}, prepare=_ames_prepare,
        depth="k", every_hit=True,
        score="lamb x similarity + (1 - lamb) x sigmoid(temp x AMES logit) (with mix: "
              "shared with chamfer); top k"),
    Reranker("chamfer", "Chamfer: the mean best cosine of the query's local descriptors "
             "among the candidate's, top k (training-free)", (
        _DETECTOR,
        Option("k", 100, int, "an integer >= 1 (images reranked)", _at_least(1)),
        Option("lamb", 0.4, float, "a number in [0, 1]", lambda v: 0 <= v <= 1),
        Option("query_len", 64, int, "an integer >= 1", _at_least(1)),
        Option("db_len", 64, int, "an integer >= 1", _at_least(1)),
        Option("bits", False, bool),
        Option("protocol", "blind", str, **_PROTOCOL),
        Option("batch_size", 8, int, "an integer >= 1 (queries per call)", _at_least(1))),
        _chamfer, needs={"global", "images", "local", "labels"}, prepare=_local_prepare,
        depth="k", every_hit=True,
        score="lamb x similarity + (1 - lamb) x mean over the query's local "
              "descriptors of their best cosine in the candidate; top k"),
    Reranker("spatial", "Spatial verification: the inliers of one homography (or "
             "fundamental matrix) among the mutual nearest neighbours of local descriptors, "
             "top k (training-free)", (
        _DETECTOR,
        Option("k", 100, int, "an integer >= 1 (images reranked)", _at_least(1)),
        Option("query_len", 256, int, "an integer >= 1", _at_least(1)),
        Option("db_len", 256, int, "an integer >= 1", _at_least(1)),
        Option("method", "homography", str, choices=("homography", "fundamental")),
        Option("threshold", 16.0, float, "a number of pixels > 0", lambda v: v > 0,
               help="the robust fit's inlier distance, px of the working size"),
        Option("protocol", "blind", str, **_PROTOCOL),
        Option("batch_size", 8, int, "an integer >= 1 (queries per call)", _at_least(1))),
        _spatial, needs={"global", "images", "local", "labels"}, prepare=_local_prepare,
        depth="k", every_hit=True,
        score="inlier count + (1 + similarity) / 2.01: the inliers of the geometric fit, "
              "ties by similarity; top k"),
):
    register(_r)


def from_candidates(Q, candidate_ids, descriptors) -> tuple[Inputs, np.ndarray]:
    """Inputs for a first stage that came from elsewhere (a vector database's top-k, your
    own index): `candidate_ids` (nq, k) your ids per query, best first; `descriptors` a
    mapping id -> vector (or a callable returning the (n, D) vectors of a list of ids);
    `Q` (nq, D) the queries' vectors (all L2-normalised, of the descriptor the reranker
    expects). The rerankers then work on the union of all queries' candidates: each query's
    ranking is its own k candidates in the given order, then the other candidates by
    similarity. Returns (inputs, ids): `ids[out.ranks[:, q]]` are your ids, reranked.

        inputs, ids = registry.from_candidates(Q, hits, lambda i: db.vectors(i))
        out = registry.rerank("alpha_qe", inputs, k=2, alpha=3.0)
        top10 = ids[out.ranks[:10, 0]]
    """
    Q = np.asarray(Q, np.float32)
    cand = np.asarray(candidate_ids)
    if cand.ndim != 2 or cand.shape[0] != Q.shape[0] or cand.shape[1] < 1:
        raise ConfigError(f"candidate_ids must be (nq = {Q.shape[0]}, k >= 1), got "
                          f"{cand.shape}")
    ids, where = np.unique(cand, return_inverse=True)          # the union, sorted
    where = where.reshape(cand.shape)
    if callable(descriptors):
        X = np.asarray(descriptors(list(ids)), np.float32)
    else:
        missing = [i for i in ids if i not in descriptors]
        if missing:
            raise ConfigError(f"no descriptor for candidate ids {missing[:5]}")
        X = np.stack([np.asarray(descriptors[i], np.float32) for i in ids])
    if X.shape != (len(ids), Q.shape[1]):
        raise ConfigError(f"descriptors of the {len(ids)} candidates must be ({len(ids)}, "
                          f"{Q.shape[1]}), got {X.shape}")
    sim = X @ Q.T                                               # (M, nq)
    ranks = np.empty((len(ids), Q.shape[0]), np.int64)
    for q in range(Q.shape[0]):
        own = list(dict.fromkeys(where[q].tolist()))            # given order, no repeats
        rest = np.setdiff1d(np.arange(len(ids)), own)
        ranks[:, q] = np.concatenate([own, rest[np.argsort(-sim[rest, q], kind="stable")]])
    return Inputs(X, Q, ranks, sim), ids


def names() -> list[str]:
    return list(RERANKERS)


def get(name: str) -> Reranker:
    if name not in RERANKERS:
        raise ConfigError(f"unknown reranker {name!r}; choose from {', '.join(RERANKERS)}")
    return RERANKERS[name]


def options(name: str, given: Mapping | None = None) -> dict:
    """The reranker's defaults updated with `given`; an unknown option or a value of the
    wrong kind or out of range is one ConfigError naming it."""
    r = get(name)
    out = dict(r.defaults)
    for key, value in dict(given or {}).items():
        if key not in out:
            raise ConfigError(f"reranker {name}: unknown option {key!r}; options: "
                              f"{', '.join(out)}")
        bad = r.option(key).problem(value)
        if bad:
            raise ConfigError(f"reranker {name}: option {key} = {value!r}, expected {bad}")
        out[key] = value
    return out


def check(name: str, values: Mapping, where: str) -> None:
    """Every option of reranker `name` in `values` (e.g. an eval config section) fits: one
    ConfigError naming `where`.option, its value and what was expected."""
    for o in get(name).options:
        bad = o.problem(values[o.name])
        if bad:
            raise ConfigError(f"{where}.{o.name} = {values[o.name]!r}: expected {bad}")


def prepare(name: str, opts: Mapping) -> dict:
    """The reranker's preparation step on `opts` (its full options): what it needs loaded
    and checked before any work (weights, detector)."""
    r = get(name)
    return r.prepare(dict(opts)) if r.prepare else dict(opts)


def with_depth(name: str, opts: Mapping, given: Mapping, rerank_k: int, k: int,
               n: int) -> dict:
    """`search`'s depth for reranker `name`: its `depth` option, when not `given`, is
    rerank_k (a prepared value of the model's own wins over it); raised to k for rerankers
    whose scores have their own scale (every hit shown is then reranked); at most n."""
    r, opts = get(name), dict(opts)
    if not r.depth:
        return opts
    d = opts[r.depth]
    if r.depth_from_rerank_k and given.get(r.depth) is None and (
            d is None or r.option(r.depth).default is not None):
        d = rerank_k
    if r.every_hit:
        d = max(int(d), k)
    opts[r.depth] = min(int(d), n)
    return opts


def rerank(name: str, inputs: Inputs, **given) -> Result:
    """Runs reranker `name` on `inputs` with its defaults updated by `given`."""
    return get(name).run(inputs, **options(name, given))
