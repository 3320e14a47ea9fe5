"""The one registry of rerankers: eval.py's pipelines, `sj.search` and the app list them and
run them from here, with the same options and defaults.

    from scvnet_jax.rerank import registry
    registry.names()                                   # every reranker
    out = registry.rerank("alpha_qe", registry.Inputs(X, Q, ranks), k=2, alpha=3.0)
    out.ranks, out.scores                              # (N, nq), and what they are sorted by

Every reranker takes a first-stage ranking (`ranks` (N, nq), best first) with the
descriptors it came from (`X` (N, D), `Q` (nq, D), L2-normalised); the CVNet verifier also
needs the model and the images. A reranker returns the new ranking and the scores its
first rows are sorted by (`Result.scores` (n, nq), descending; n = what it reranked).

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
    """ranks: (N, nq) int64, or (E, M, H) rankings for the official CVNet protocol;
    scores: (n, nq) float32, what the first n rows of the ranking are sorted by;
    protocol: "label-free", or the CVNet protocol."""
    ranks: Any
    scores: np.ndarray | None
    protocol: str = LABEL_FREE


@dataclasses.dataclass(frozen=True)
class Reranker:
    name: str
    summary: str
    defaults: Mapping[str, Any]
    run: Callable[..., Result]
    needs_images: bool = False           # the CVNet verifier reads the images again
    needs_weights: bool = False          # a trained model of its own: option "weights"
    score: str = ""                      # what Result.scores means


def _sorted_scores(sim_cols: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    return np.take_along_axis(sim_cols, ranks, axis=0).astype(np.float32)


def _superglobal(inp: Inputs, M: int, K: int, beta: float) -> Result:
    from scvnet_jax.rerank.superglobal import superglobal
    ranks, scores = superglobal(inp.X, inp.Q, inp.ranks, M=M, K=K, beta=beta,
                                return_scores=True)
    return Result(ranks, scores)


def _cvnet(inp: Inputs, topk: int, mix: float, protocol: str) -> Result:
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
    scores = verify.verification_scores(
        inp.model, inp.query_images, inp.db_images, candidates,
        batch_size=s.get("batch_size", 0), bucket=s.get("bucket", 64),
        feature_bucket=s.get("feature_bucket", 4), cache=s.get("cache"),
        workers=s.get("workers", 4))
    sim = inp.similarity()
    mixed = np.array(sim, np.float32)
    has = ~np.isnan(scores)
    mixed[has] += mix * scores[has]
    if protocol == "official":
        out = cvnet.official(inp.ranks, sim, scores, inp.gnd, topk, mix)
        return Result(out, None, protocol)
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
                          shortlist=shortlist or None, max_bytes=max_bytes or None,
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
    if isinstance(weights, csa.CSA):
        return weights
    if not weights:
        raise ConfigError("the csa reranker needs weights: a CSA model directory (train.py "
                          "--config configs/csa_demo.py writes one) or an official "
                          "checkpoint (--csa_weights / csa.weights)")
    return _load_once(("csa", str(weights), dtype), lambda: csa.load(weights, dtype=dtype))


def _csa(inp: Inputs, weights, topk: int, dtype: str) -> Result:
    model = csa_model(weights, dtype)
    if not topk:            # 0: the topk the model was trained with, else the official 128
        topk = model.topk or 128
    ranks, scores = model.rerank(inp.X, inp.Q, inp.ranks, topk=topk, return_scores=True)
    return Result(ranks, scores.astype(np.float32))


def ames_model(weights, dtype: str = "float32"):
    """The AMES model of `weights` (an AMES object, a model directory or an official
    checkpoint), loaded once per process."""
    from scvnet_jax.rerank import ames
    if isinstance(weights, ames.AMES):
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


def _ames(inp: Inputs, weights, detector: str, k: int, lamb: float, temp: float,
          query_len: int, db_len: int, protocol: str, batch_size: int) -> Result:
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
        k=k or None, lamb=None if lamb < 0 else lamb, temp=None if temp < 0 else temp,
        query_len=query_len or None, db_len=db_len or None, protocol=protocol, gnd=inp.gnd,
        cache_dir=s.get("cache_dir"),
        batch_size=batch_size or 64, extract_batch_size=s.get("batch_size", 0),
        bucket=s.get("bucket", 64), workers=s.get("workers", 4))
    if protocol == "official":      # Easy and Medium from the medium run, as the authors
        return Result((out["medium"][0], out["medium"][0], out["hard"][0]), None, protocol)
    return Result(*out[""], protocol)


def _chamfer(inp: Inputs, detector: str, k: int, lamb: float, query_len: int, db_len: int,
             bits: bool, protocol: str, batch_size: int) -> Result:
    from scvnet_jax.rerank import chamfer
    if inp.model is None or inp.query_images is None or inp.db_images is None:
        raise ConfigError("the chamfer reranker reads local descriptors: it needs the model "
                          "and the query and database images")
    sim = inp.similarity()
    ranks = np.asarray(inp.ranks)
    s = dict(inp.settings)
    out = chamfer.rerank_images(
        inp.model, inp.query_images, inp.db_images, ranks,
        np.take_along_axis(np.asarray(sim, np.float32), ranks, axis=0),
        detector=ames_detector(detector), k=k, lamb=lamb, query_len=query_len,
        db_len=db_len, bits=bits, protocol=protocol, gnd=inp.gnd,
        cache_dir=s.get("cache_dir"), batch_size=batch_size or 8,
        extract_batch_size=s.get("batch_size", 0), bucket=s.get("bucket", 64),
        workers=s.get("workers", 4))
    if protocol == "official":      # Easy and Medium from the medium run, as ames
        return Result((out["medium"][0], out["medium"][0], out["hard"][0]), None, protocol)
    return Result(*out[""], protocol)


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


RERANKERS: dict[str, Reranker] = {r.name: r for r in (
    Reranker("superglobal", "SuperGlobal reranking (MDescAug + RerankwMDA) of the top M",
             {"M": 400, "K": 9, "beta": 0.15}, _superglobal,
             score="(similarity to the query + to the expanded query) / 2, augmented "
                   "descriptors; top M"),
    Reranker("cvnet", "CVNet-Rerank: similarity + mix x verification score of the top k",
             {"topk": 100, "mix": 0.5, "protocol": "blind"}, _cvnet, needs_images=True,
             score="similarity + mix x verification score in [0, 1]; top k"),
    Reranker("icfrr", "ICFRR: iterative cluster-free re-ranking of the whole ranking",
             {"KG": 256, "KQ": 250, "beta": 0.5, "n_times": 5, "limited_memory": False,
              "shortlist": 0, "max_bytes": 0}, _icfrr,
             score="-distance + beta x votes of the last iteration; every item"),
    Reranker("csa", "CSA: a transformer over affinity features re-orders the top k",
             {"weights": "", "topk": 0, "dtype": "float32"}, _csa, needs_weights=True,
             score="cosine of the candidate's and the query's CSA output tokens; top k"),
    Reranker("alpha_qe", "alpha-weighted query expansion, the whole database re-ranked",
             {"k": 2, "alpha": 3.0}, _alpha_qe,
             score="similarity to the expanded query; every item"),
    Reranker("dba", "alpha-weighted database augmentation, then exact search",
             {"k": 2, "alpha": 3.0}, _dba,
             score="similarity of the query to the augmented descriptor; every item"),
    Reranker("ames", "AMES: a transformer over local descriptors scores the top k",
             {"weights": "", "detector": "", "k": 0, "lamb": -1.0, "temp": -1.0,
              "query_len": 0, "db_len": 0, "protocol": "blind", "batch_size": 64}, _ames,
             needs_images=True, needs_weights=True,
             score="lamb x similarity + (1 - lamb) x sigmoid(temp x AMES logit); top k "
                   "(0 / -1: the model's defaults)"),
    Reranker("chamfer", "Chamfer: the mean best cosine of the query's local descriptors "
             "among the candidate's, top k (training-free)",
             {"detector": "", "k": 100, "lamb": 0.4, "query_len": 64, "db_len": 64,
              "bits": False, "protocol": "blind", "batch_size": 8}, _chamfer,
             needs_images=True,
             score="lamb x similarity + (1 - lamb) x mean over the query's local "
                   "descriptors of their best cosine in the candidate; top k"),
)}


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
    wrong kind is one ConfigError naming it."""
    r = get(name)
    out = dict(r.defaults)
    for key, value in dict(given or {}).items():
        if key not in out:
            raise ConfigError(f"reranker {name}: unknown option {key!r}; options: "
                              f"{', '.join(out)}")
        default = out[key]
        if isinstance(default, bool):
            ok = isinstance(value, (bool, np.bool_))
        elif isinstance(default, int):
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
                  and math.isfinite(float(value)))
        else:
            ok = True
        if not ok:
            raise ConfigError(f"reranker {name}: option {key} = {value!r}, expected "
                              f"{type(default).__name__}")
        out[key] = value
    return out


def rerank(name: str, inputs: Inputs, **given) -> Result:
    """Runs reranker `name` on `inputs` with its defaults updated by `given`."""
    return get(name).run(inputs, **options(name, given))
