"""Chamfer: a training-free local score of the first stage's top k.

For a query and a candidate, the mean over the query's local descriptors of their best
cosine among the candidate's (a one-sided chamfer similarity), on the local descriptors
AMES reads (`engine.local.extract_local`: the retrieval model's stage-3 features, the
strongest `query_len` of a query and `db_len` of a database image, or the official
detector's descriptors when one is given). No weights of its own. Database descriptors
are kept by content in the cache folder (one small file per image, as AMES's tokens), as
float16, or with `bits` as packed sign bits (np.packbits of d >= 0, as AMES's dist codes):
then the cosine is the one of the +-1 vectors, 1 - 2 x hamming / D.

    s = lamb x first-stage similarity + (1 - lamb) x chamfer     (the top k, sorted by s)

lamb 0.4 by default: chosen on the demo *training* photos (benchmarks/tune_rerankers.py:
mAP 45.61 first stage, 47.93 chamfer alone, 50.63 with lamb 0.4), not on a benchmark.

    from scvnet_jax.rerank import chamfer
    s = chamfer.scores(q, q_mask, db, db_mask)          # (nq, k): db (nq, k, L, D)
"""
from __future__ import annotations

from functools import partial
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from scvnet_jax.errors import ConfigError, InputError


@partial(jax.jit, static_argnames=("bits",))
def _scores(q, q_mask, db, db_mask, *, bits: int):
    """q (B, Lq, W), q_mask (B, Lq) True = padding, db (B, k, Ld, W), db_mask (B, k, Ld)
    -> (B, k) float32 mean over the query's valid rows of their best cosine among the
    candidate's valid rows. bits > 0: W = ceil(bits / 8) packed sign bits (uint8)."""
    if bits:
        def signs(x):       # packed bits -> +-1, the first `bits` of each row
            b = jnp.unpackbits(x, axis=-1, count=bits)
            return 2.0 * b.astype(jnp.float32) - 1.0
        qn = signs(q) / np.sqrt(bits)
        dn = signs(db) / np.sqrt(bits)
    else:
        def unit(x):
            x = x.astype(jnp.float32)
            return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        qn, dn = unit(q), unit(db)
    sim = jnp.einsum("bqd,bkld->bkql", qn, dn, precision=jax.lax.Precision.HIGHEST)
    sim = jnp.where(db_mask[:, :, None, :], -jnp.inf, sim)      # padding never the best
    best = sim.max(axis=-1)                                     # (B, k, Lq)
    valid = ~q_mask[:, None, :]
    best = jnp.where(valid & jnp.isfinite(best), best, 0.0)     # no valid db row: 0
    n = jnp.maximum(valid.sum(-1), 1)
    return best.sum(-1) / n


def checked_pairs(who: str, q, q_mask, db, db_mask) -> tuple:
    """(q, q_mask, db, db_mask) as arrays, checked: queries (nq, Lq, D), their candidates
    (nq, k, Ld, D), masks (nq, Lq) and (nq, k, Ld); one InputError naming `who` if not."""
    q, db = np.asarray(q), np.asarray(db)
    q_mask, db_mask = np.asarray(q_mask, bool), np.asarray(db_mask, bool)
    if q.ndim != 3 or db.ndim != 4 or db.shape[0] != q.shape[0] or db.shape[3] != q.shape[2]:
        raise InputError(f"{who}: q must be (nq, Lq, D) and db (nq, k, Ld, D), got "
                         f"{q.shape} and {db.shape}")
    if q_mask.shape != q.shape[:2] or db_mask.shape != db.shape[:3]:
        raise InputError(f"{who}: masks must be {q.shape[:2]} and {db.shape[:3]}, got "
                         f"{q_mask.shape} and {db_mask.shape}")
    return q, q_mask, db, db_mask


def scores(q, q_mask, db, db_mask, *, bits: int = 0, batch_size: int = 8) -> np.ndarray:
    """Chamfer scores (nq, k) float32 of queries q (nq, Lq, D) against their candidates db
    (nq, k, Ld, D) (float16/32 descriptors, any norm; or with `bits` = D their packed sign
    bits, uint8 (..., ceil(D / 8))); masks True = padding. Queries go `batch_size` at a time,
    the last batch padded: one compiled program per shape."""
    q, q_mask, db, db_mask = checked_pairs("chamfer", q, q_mask, db, db_mask)
    if bits and (q.dtype != np.uint8 or db.dtype != np.uint8 or q.shape[2] != -(-bits // 8)):
        raise InputError(f"chamfer: {bits} packed bits are uint8 rows of {-(-bits // 8)} bytes"
                         f", got {q.dtype} {q.shape[2]} and {db.dtype} {db.shape[3]}")
    nq, k = db.shape[:2]
    out = np.zeros((nq, k), np.float32)
    if not bits:
        q, db = q.astype(np.float16, copy=False), db.astype(np.float16, copy=False)
    B = max(1, min(int(batch_size), nq))
    for s in range(0, nq, B):
        n = min(B, nq - s)
        parts = [q[s:s + n], q_mask[s:s + n], db[s:s + n], db_mask[s:s + n]]
        if n < B:                               # pad the batch: the same compiled program
            parts = [np.concatenate([p, np.ones((B - n,) + p.shape[1:], p.dtype)
                                     if p.dtype == bool else
                                     np.zeros((B - n,) + p.shape[1:], p.dtype)]) for p in parts]
        out[s:s + n] = np.asarray(_scores(*parts, bits=int(bits)))[:n]
    return out


def codes(desc, bits: bool) -> np.ndarray:
    """The stored form of local descriptors (..., D): float16, or packed sign bits."""
    from scvnet_jax.rerank.ames import pack_codes
    return pack_codes(np.asarray(desc)) if bits else np.asarray(desc, np.float16)


def database_locals(retrieval_model, refs, *, detector=None, topk: int = 64, scales=None,
                    bits: bool = False, cache_dir: str | None = None, batch_size: int = 0,
                    bucket: int = 64, workers: int = 4, desc: str = "chamfer db"):
    """(descriptors (n, topk, D) float16 or (n, topk, ceil(D / 8)) uint8 packed bits, mask
    (n, topk) True = padding) of database images `refs`: from the content-keyed store in
    cache_dir where present (keyed by backbone, detector, topk, scales, bits), else
    extracted (`engine.local.extract_local`, float32) and stored."""
    from scvnet_jax.engine import local
    from scvnet_jax.rerank.ames import stored_local_rows
    dim = local.descriptor_dim(retrieval_model, detector)
    return stored_local_rows(
        retrieval_model, refs, lambda feats: codes(feats.desc, bits),
        (-(-dim // 8) if bits else dim,), np.uint8 if bits else np.float16,
        {"chamfer_format": 1, "bits": bool(bits)}, detector=detector, topk=topk,
        scales=scales, cache_dir=cache_dir, kind="chamfer-locals", batch_size=batch_size,
        bucket=bucket, workers=workers, desc=desc)


def combine(ranks, sims, chamfer, *, k: int, lamb: float):
    """s = lamb x sims + (1 - lamb) x chamfer over the first k rows of (ranks, sims) (K, nq),
    sorted by s (descending), the rest unchanged -> (ranks, s sorted (k, nq))."""
    s = (np.float32(lamb) * np.asarray(sims[:k], np.float32)
         + np.float32(1 - lamb) * np.asarray(chamfer[:k], np.float32))
    order = np.argsort(-s, axis=0, kind="stable")
    out = np.array(ranks, copy=True)
    out[:k] = np.take_along_axis(out[:k], order, axis=0)
    return out, np.take_along_axis(s, order, axis=0)


def rerank_images(retrieval_model, query_refs, db_refs, ranks, sims, *, detector=None,
                  k: int = 100, lamb: float = 0.4, query_len: int = 64, db_len: int = 64,
                  bits: bool = False, scales=None, protocol: str = "blind", gnd=None,
                  cache_dir: str | None = None, batch_size: int = 8,
                  extract_batch_size: int = 0, bucket: int = 64, workers: int = 4):
    """Chamfer re-ranking of a first stage (ranks, sims (N or K, nq), best first) over image
    files, as `ames.rerank_images` (the same descriptors, shortlists and protocols):
    the queries' `query_len` local descriptors (cropped to their boxes), the shortlisted
    database images' `db_len` (kept by content in `cache_dir`).

    Returns {setting: (ranks (same shape as given), scores (k', nq))}: setting "" for
    protocol "blind"; "medium" and "hard" for "official" (see `ames.shortlist`)."""
    from scvnet_jax.engine import local
    from scvnet_jax.rerank.ames.pipeline import _image_refs
    query_refs = _image_refs(query_refs, "query_refs")
    db_refs = _image_refs(db_refs, "db_refs")
    if not 0 <= float(lamb) <= 1:
        raise ConfigError(f"chamfer: lamb must be in [0, 1], got {lamb!r}")
    ranks, lists, depth, kk, union = local_shortlists(
        "chamfer", ranks, sims, k=k, query_len=query_len, db_len=db_len, protocol=protocol,
        gnd=gnd)
    scales = tuple(scales or local.SCALES)
    q_feats = local.extract_local(retrieval_model, list(query_refs), detector, query_len,
                                  scales, extract_batch_size, bucket=bucket,
                                  dtype=np.float32, workers=workers, desc="chamfer queries")
    q = codes(q_feats.desc, bits)
    db, db_mask = database_locals(retrieval_model, [db_refs[i] for i in union],
                                  detector=detector, topk=db_len, scales=scales, bits=bits,
                                  cache_dir=cache_dir, batch_size=extract_batch_size,
                                  bucket=bucket, workers=workers)
    D = local.descriptor_dim(retrieval_model, detector) if bits else 0

    def rescore(idx, r, v):
        c = scores(q, q_feats.mask, db[idx], db_mask[idx], bits=D, batch_size=batch_size)
        return combine(r, v, c.T, k=kk, lamb=float(lamb))
    return rerank_shortlists(ranks, lists, depth, kk, union, rescore)


def local_shortlists(who: str, ranks, sims, *, k, query_len, db_len, protocol: str, gnd):
    """The shared start of the rerankers over local descriptors of image files (chamfer,
    spatial): their options checked (one ConfigError naming `who`), then the shortlists
    of `ames.shortlist` per setting ("" for protocol blind; "medium" and "hard" for
    official, deep enough that moving junk (+ easy) out still leaves k). Returns (ranks,
    {setting: (ranks, sims)}, depth, k' (rows re-scored), the database rows any list
    re-scores, sorted)."""
    from scvnet_jax.rerank import ames
    from scvnet_jax.rerank.ames.scoring import _check_shortlist
    for name, v in (("k", k), ("query_len", query_len), ("db_len", db_len)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"{who}: {name} must be an integer >= 1, got {v!r}")
    if protocol not in ames.PROTOCOLS:
        raise ConfigError(f"{who}: protocol must be one of {ames.PROTOCOLS}, got "
                          f"{protocol!r}")
    if protocol == "official" and gnd is None:
        raise ConfigError(f"{who}: protocol 'official' needs the ground truth; use 'blind' "
                          "on data without labels")
    ranks, sims = _check_shortlist(ranks, sims)
    settings = ("",) if protocol == "blind" else ames.SETTINGS
    g = gnd["gnd"] if isinstance(gnd, Mapping) else gnd
    depth = int(k)
    if protocol == "official":
        depth += max((len(x.get("junk", ())) + len(x.get("easy", ())) for x in g), default=0)
    depth = min(depth, ranks.shape[0])
    lists = {s: ames.shortlist(ranks[:depth], sims[:depth], protocol=protocol, gnd=gnd,
                               setting=s or "medium") for s in settings}
    kk = min(int(k), depth)
    union = np.unique(np.concatenate([r[:kk].reshape(-1) for r, _ in lists.values()]))
    return ranks, lists, depth, kk, union


def rerank_shortlists(ranks, lists, depth: int, kk: int, union, rescore) -> dict:
    """{setting: (ranks re-ordered in their first `depth` rows, scores (k', nq))}:
    rescore(idx (nq, k') rows of `union`, list ranks, list sims) -> (ranks, scores) per
    list of `local_shortlists`."""
    where = np.full(int(ranks.max()) + 1, -1, np.int64)
    where[union] = np.arange(len(union))
    out = {}
    for s, (r, v) in lists.items():
        rr, sc = rescore(where[r[:kk]].T, r, v)
        full = ranks.copy()
        full[:depth] = rr
        out[s] = (full, sc)
    return out


__all__ = ["combine", "database_locals", "rerank_images", "scores"]
