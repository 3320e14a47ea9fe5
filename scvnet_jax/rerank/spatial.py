"""Spatial verification: why a hit matched, and its inlier count as a reranker.

Two images' local descriptors (the ones AMES and chamfer read: `engine.local.extract_local`,
the retrieval model's stage-3 features at three scales, the strongest `query_len` of the
query and `db_len` of the database image; or the official detector's) are paired as mutual
nearest neighbours (cosine); the pairs are then verified geometrically with OpenCV's robust
estimation (USAC MAGSAC, deterministic: its generator is seeded): one homography (a planar
scene, or a photo of a photo) or one fundamental matrix (any rigid 3-D scene, weaker: a
point needs only lie near a line). The pairs it keeps are the inliers.

A location is the centre of its stage-3 cell (16 px / scale, `engine.local`), so positions
are coarse: `threshold` (px, in the image as read at its working size) is about one cell.

    from scvnet_jax.rerank import spatial
    c = spatial.explain_images(model, "query.jpg", "hit.jpg")
    c.inliers, c.query_xy[c.inlier], c.hit_xy[c.inlier]     # in pixels of the files
    spatial.draw(c, "query.jpg", "hit.jpg")                 # BGR picture, lines between them

As a reranker (`spatial` in the registry): the first stage's top k sorted by their inlier
count, ties by the first stage's similarity (score = inliers + (1 + similarity) / 2.01);
the rest keep their order.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from scvnet_jax.errors import ConfigError
from scvnet_jax.rerank.chamfer import checked_pairs

METHODS = ("homography", "fundamental")
MIN_PAIRS = {"homography": 4, "fundamental": 8}   # fewer mutual pairs: nothing verified
QUERY_LEN = DB_LEN = 256
THRESHOLD = 16.0          # px: one stage-3 cell at scale 1


@dataclasses.dataclass
class Correspondences:
    """The mutual nearest neighbours of a query and a hit, and which a geometry keeps.

    query_xy, hit_xy: (n, 2) float32 (x, y), in pixels of the upright images at full size
      (a query's box already added back), as a browser shows the files;
    similarity: (n,) float32 cosine of each pair's descriptors;
    inlier: (n,) bool, kept by the geometry; method, threshold: how it was verified;
    query_size, hit_size: (width, height) of the upright images at full size."""
    query_xy: np.ndarray
    hit_xy: np.ndarray
    similarity: np.ndarray
    inlier: np.ndarray
    method: str = "homography"
    threshold: float = THRESHOLD
    query_size: tuple = (0, 0)
    hit_size: tuple = (0, 0)

    @property
    def inliers(self) -> int:
        return int(self.inlier.sum())

    def __len__(self) -> int:
        return int(self.inlier.shape[0])

    def as_dict(self) -> dict:
        """JSON-ready: sizes, counts and one row per pair [qx, qy, hx, hy, cosine, inlier]."""
        r = lambda v: round(float(v), 1)       # noqa: E731
        return {"method": self.method, "threshold": self.threshold,
                "query_size": list(map(int, self.query_size)),
                "hit_size": list(map(int, self.hit_size)),
                "correspondences": len(self), "inliers": self.inliers,
                "pairs": [[r(q[0]), r(q[1]), r(h[0]), r(h[1]), round(float(s), 4), bool(i)]
                          for q, h, s, i in zip(self.query_xy, self.hit_xy, self.similarity,
                                                self.inlier)]}


def _check(method: str, threshold) -> None:
    if method not in METHODS:
        raise ConfigError(f"spatial: method must be one of {', '.join(METHODS)}, got "
                          f"{method!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) \
            or not np.isfinite(threshold) or threshold <= 0:
        raise ConfigError(f"spatial: threshold must be a number of pixels > 0, got "
                          f"{threshold!r}")


@jax.jit
def _mutual(q, q_mask, db, db_mask):
    """q (B, Lq, D), db (B, k, Ld, D), masks True = padding -> (forward (B, k, Lq) int32 best
    db row of each query row, its cosine (B, k, Lq), mutual (B, k, Lq) bool: that db row's
    best query row is this one; padding never matches)."""
    def unit(x):
        x = x.astype(jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    sim = jnp.einsum("bqd,bkld->bkql", unit(q), unit(db),
                     precision=jax.lax.Precision.HIGHEST)
    bad = q_mask[:, None, :, None] | db_mask[:, :, None, :]
    sim = jnp.where(bad, -jnp.inf, sim)
    fwd = jnp.argmax(sim, axis=-1).astype(jnp.int32)                 # (B, k, Lq)
    back = jnp.argmax(sim, axis=-2).astype(jnp.int32)                # (B, k, Ld)
    best = jnp.max(sim, axis=-1)
    rows = jnp.arange(q.shape[1], dtype=jnp.int32)
    mutual = (jnp.take_along_axis(back, fwd, axis=-1) == rows) & jnp.isfinite(best)
    return fwd, best, mutual


def mutual_pairs(q, q_mask, db, db_mask, *, batch_size: int = 8):
    """Mutual nearest neighbours of queries q (nq, Lq, D) and their candidates db
    (nq, k, Ld, D) (any float dtype, any norm; masks True = padding) -> a list per query of
    a list per candidate of (query rows (m,), db rows (m,), cosines (m,)). Queries go
    `batch_size` at a time, the last batch padded: one compiled program per shape."""
    q, q_mask, db, db_mask = checked_pairs("spatial", q, q_mask, db, db_mask)
    q, db = q.astype(np.float16, copy=False), db.astype(np.float16, copy=False)
    nq = q.shape[0]
    B = max(1, min(int(batch_size), nq))
    out = []
    for s in range(0, nq, B):
        n = min(B, nq - s)
        parts = [q[s:s + n], q_mask[s:s + n], db[s:s + n], db_mask[s:s + n]]
        if n < B:                               # pad the batch: the same compiled program
            parts = [np.concatenate([p, (np.ones if p.dtype == bool else np.zeros)(
                (B - n,) + p.shape[1:], p.dtype)]) for p in parts]
        fwd, best, mutual = (np.asarray(a)[:n] for a in _mutual(*parts))
        for i in range(n):
            out.append([(np.flatnonzero(m), f[m], b[m]) for f, b, m in
                        zip(fwd[i], best[i], mutual[i])])
    return out


def verify(query_xy, hit_xy, method: str = "homography", threshold: float = THRESHOLD,
           *, max_iters: int = 2000, confidence: float = 0.999) -> np.ndarray:
    """Which pairs one geometry explains: (n,) bool inliers of OpenCV's USAC MAGSAC fit of a
    homography (query -> hit) or a fundamental matrix to points (n, 2) (x, y) in pixels.
    Deterministic (OpenCV seeds its USAC generator). Fewer than MIN_PAIRS[method] pairs, or
    a degenerate set (every point on one spot): none."""
    import cv2
    _check(method, threshold)
    a = np.ascontiguousarray(query_xy, np.float32).reshape(-1, 2)
    b = np.ascontiguousarray(hit_xy, np.float32).reshape(-1, 2)
    n = a.shape[0]
    none = np.zeros(n, bool)
    if n < MIN_PAIRS[method]:
        return none
    try:
        if method == "homography":
            M, inl = cv2.findHomography(a, b, cv2.USAC_MAGSAC, float(threshold),
                                        maxIters=max_iters, confidence=confidence)
        else:
            M, inl = cv2.findFundamentalMat(a, b, cv2.USAC_MAGSAC, float(threshold),
                                            confidence, max_iters)
    except cv2.error:
        return none
    if M is None or inl is None:
        return none
    return inl.reshape(-1).astype(bool)


def to_full(yx, path: str, box=None, max_side: int | None = None) -> np.ndarray:
    """Positions `yx` (n, 2) (y, x) in pixels of the image as read (`images.read_image`: at
    its working size, cropped to `box`) -> (n, 2) float32 (x, y) in pixels of the upright
    image at full size (what a box is given in, and a browser shows)."""
    from scvnet_jax import images
    size = images.image_size(path)
    working = images.working_size(*size, max_side)
    x0, y0 = (0, 0) if box is None else images.box_at(box, size, working)[:2]
    yx = np.asarray(yx, np.float64).reshape(-1, 2)
    fx, fy = size[0] / working[0], size[1] / working[1]
    return np.stack([(x0 + yx[:, 1]) * fx, (y0 + yx[:, 0]) * fy], 1).astype(np.float32)


def correspondences(q_yx, q_desc, q_mask, d_yx, d_desc, d_mask, *, method: str = "homography",
                    threshold: float = THRESHOLD) -> tuple:
    """(query rows, db rows, cosines, inlier) of one pair's mutual nearest neighbours
    verified by `method` in the working pixels the positions are in."""
    _check(method, threshold)
    (pairs,) = mutual_pairs(np.asarray(q_desc)[None], np.asarray(q_mask)[None],
                            np.asarray(d_desc)[None, None], np.asarray(d_mask)[None, None],
                            batch_size=1)
    qi, di, cos = pairs[0]
    q_yx, d_yx = np.asarray(q_yx, np.float32), np.asarray(d_yx, np.float32)
    inl = verify(q_yx[qi][:, ::-1], d_yx[di][:, ::-1], method, threshold)
    return qi, di, cos, inl


def explain_images(retrieval_model, query, hit, *, box=None, detector=None,
                   query_len: int = QUERY_LEN, db_len: int = DB_LEN,
                   method: str = "homography", threshold: float = THRESHOLD,
                   cache_dir: str | None = None, query_features=None) -> Correspondences:
    """Why `hit` (an image file) matched `query` (an image file, cropped to `box`, x1, y1,
    x2, y2 in its full-size pixels): their verified correspondences (`Correspondences`).
    The hit's descriptors come from the content-keyed store in `cache_dir` where present
    (as the spatial reranker keeps them); `query_features`: the query's LocalFeatures
    (one image) when already computed (`query_locals`)."""
    from scvnet_jax.images import ImageRef, image_size
    _check(method, threshold)
    q = query_features if query_features is not None else query_locals(
        retrieval_model, ImageRef(str(query), box), detector=detector, query_len=query_len)
    rows, mask = database_locals(retrieval_model, [ImageRef(str(hit))], detector=detector,
                                 topk=db_len, cache_dir=cache_dir)
    qi, di, cos, inl = correspondences(q.yx[0], q.desc[0], q.mask[0], rows[0, :, :2],
                                       rows[0, :, 2:], mask[0], method=method,
                                       threshold=threshold)
    return Correspondences(to_full(q.yx[0][qi], str(query), box),
                           to_full(rows[0, di, :2], str(hit)), cos.astype(np.float32), inl,
                           method, float(threshold), image_size(str(query)),
                           image_size(str(hit)))


def query_locals(retrieval_model, ref, *, detector=None, query_len: int = QUERY_LEN,
                 batch_size: int = 0, bucket: int = 64):
    """LocalFeatures (one image) of a query ImageRef (its box applied), float32."""
    from scvnet_jax.engine import local
    return local.extract_local(retrieval_model, [ref], detector, int(query_len),
                               batch_size=batch_size, bucket=bucket, dtype=np.float32,
                               desc="spatial query")


def database_locals(retrieval_model, refs, *, detector=None, topk: int = DB_LEN, scales=None,
                    cache_dir: str | None = None, batch_size: int = 0, bucket: int = 64,
                    workers: int = 4, desc: str = "spatial db"):
    """(rows (n, topk, 2 + D) float16 = [y, x, descriptor], mask (n, topk) True = padding)
    of database images `refs`: from the content-keyed store in cache_dir where present,
    else extracted and stored. Positions in float16 are exact to 0.5 px up to 2048 px,
    far below a cell (16 px)."""
    from scvnet_jax.engine import local
    from scvnet_jax.rerank.ames import stored_local_rows
    dim = local.descriptor_dim(retrieval_model, detector)

    def convert(feats):
        return np.concatenate([feats.yx, np.asarray(feats.desc, np.float32)],
                              axis=-1).astype(np.float16)
    return stored_local_rows(retrieval_model, refs, convert, (2 + dim,), np.float16,
                             {"spatial_format": 1}, detector=detector, topk=topk,
                             scales=scales, cache_dir=cache_dir, kind="spatial-locals",
                             batch_size=batch_size, bucket=bucket, workers=workers, desc=desc)


def inlier_counts(q_feats, db_rows, db_mask, *, method: str = "homography",
                  threshold: float = THRESHOLD, batch_size: int = 8) -> np.ndarray:
    """Inlier counts (nq, k) int32 of queries (LocalFeatures of nq images) against their
    candidates' stored rows db_rows (nq, k, Ld, 2 + D) (`database_locals`)."""
    _check(method, threshold)
    db_rows = np.asarray(db_rows)
    pairs = mutual_pairs(q_feats.desc, q_feats.mask, db_rows[..., 2:], db_mask,
                         batch_size=batch_size)
    out = np.zeros(db_rows.shape[:2], np.int32)
    for i, per in enumerate(pairs):
        for j, (qi, di, _) in enumerate(per):
            a = q_feats.yx[i][qi][:, ::-1]
            b = db_rows[i, j, di, :2].astype(np.float32)[:, ::-1]
            out[i, j] = int(verify(a, b, method, threshold).sum())
    return out


def combine(ranks, sims, inliers, *, k: int):
    """The first k rows of (ranks, sims) (K, nq) sorted by inliers, ties by similarity:
    s = inliers + (1 + sims) / 2.01 (its whole part is the count) -> (ranks, s (k, nq))."""
    s = (np.asarray(inliers[:k], np.float32)
         + (1 + np.clip(np.asarray(sims[:k], np.float32), -1, 1)) / np.float32(2.01))
    order = np.argsort(-s, axis=0, kind="stable")
    out = np.array(ranks, copy=True)
    out[:k] = np.take_along_axis(out[:k], order, axis=0)
    return out, np.take_along_axis(s, order, axis=0)


def rerank_images(retrieval_model, query_refs, db_refs, ranks, sims, *, detector=None,
                  k: int = 100, query_len: int = QUERY_LEN, db_len: int = DB_LEN,
                  method: str = "homography", threshold: float = THRESHOLD,
                  protocol: str = "blind", gnd=None, cache_dir: str | None = None,
                  batch_size: int = 8, extract_batch_size: int = 0, bucket: int = 64,
                  workers: int = 4) -> dict:
    """Spatial re-ranking of a first stage (ranks, sims (N or K, nq), best first) over image
    files, with the shortlists and protocols of `ames.rerank_images`: each of the top k is
    scored by its inlier count. Returns {setting: (ranks, scores (k', nq))}."""
    from scvnet_jax.engine import local
    from scvnet_jax.rerank.ames.pipeline import _image_refs
    from scvnet_jax.rerank.chamfer import local_shortlists, rerank_shortlists
    query_refs = _image_refs(query_refs, "query_refs")
    db_refs = _image_refs(db_refs, "db_refs")
    _check(method, threshold)
    ranks, lists, depth, kk, union = local_shortlists(
        "spatial", ranks, sims, k=k, query_len=query_len, db_len=db_len, protocol=protocol,
        gnd=gnd)
    q_feats = local.extract_local(retrieval_model, list(query_refs), detector, int(query_len),
                                  local.SCALES, extract_batch_size, bucket=bucket,
                                  dtype=np.float32, workers=workers, desc="spatial queries")
    db, db_mask = database_locals(retrieval_model, [db_refs[i] for i in union],
                                  detector=detector, topk=int(db_len), cache_dir=cache_dir,
                                  batch_size=extract_batch_size, bucket=bucket,
                                  workers=workers)

    def rescore(idx, r, v):
        inl = inlier_counts(q_feats, db[idx], db_mask[idx], method=method,
                            threshold=threshold, batch_size=batch_size)
        return combine(r, v, inl.T, k=kk)
    return rerank_shortlists(ranks, lists, depth, kk, union, rescore)


def draw(c: Correspondences, query, hit, *, box=None, height: int = 480,
         outliers: bool = True, title: str = "") -> np.ndarray:
    """A BGR uint8 picture: the query (its box drawn) and the hit side by side at `height`
    px, a line per inlier (green) and, with `outliers`, a thin grey one per other pair;
    a caption with the counts."""
    import cv2

    from scvnet_jax.images import read_image
    pics, scales = [], []
    for path, size in ((query, c.query_size), (hit, c.hit_size)):
        im = read_image(str(path))
        s = height / im.shape[0]
        pics.append(cv2.resize(im, (max(1, round(im.shape[1] * s)), height),
                               interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR))
        scales.append(pics[-1].shape[1] / size[0] if size[0] else s)
    gap = 8
    canvas = np.full((height + 34, pics[0].shape[1] + gap + pics[1].shape[1], 3), 255,
                     np.uint8)
    canvas[:height, :pics[0].shape[1]] = pics[0]
    off = pics[0].shape[1] + gap
    canvas[:height, off:] = pics[1]
    if box is not None:
        x1, y1, x2, y2 = (round(v * scales[0]) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (83, 200, 0), 2, cv2.LINE_AA)
    order = np.argsort(c.inlier, kind="stable")          # inliers drawn last, on top
    for i in order:
        if not c.inlier[i] and not outliers:
            continue
        a = (round(float(c.query_xy[i, 0]) * scales[0]), round(float(c.query_xy[i, 1]) * scales[0]))
        b = (off + round(float(c.hit_xy[i, 0]) * scales[1]),
             round(float(c.hit_xy[i, 1]) * scales[1]))
        colour, width = ((0, 200, 0), 2) if c.inlier[i] else ((170, 170, 170), 1)
        cv2.line(canvas, a, b, colour, width, cv2.LINE_AA)
        cv2.circle(canvas, a, 3, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas, b, 3, colour, -1, cv2.LINE_AA)
    text = (f"{c.inliers} inliers of {len(c)} mutual nearest neighbours ({c.method}, "
            f"{c.threshold:g} px)") + (f"  {title}" if title else "")
    cv2.putText(canvas, text, (6, height + 23), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1,
                cv2.LINE_AA)
    return canvas


__all__ = ["Correspondences", "METHODS", "combine", "correspondences", "database_locals",
           "draw", "explain_images", "inlier_counts", "mutual_pairs", "query_locals",
           "rerank_images", "to_full", "verify"]
