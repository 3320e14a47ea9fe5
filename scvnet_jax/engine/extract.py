"""Descriptor extraction and verification scoring over image collections.

Images are read in a thread pool (OpenCV releases the GIL), preprocessed exactly as the
official test code does, grouped into padded size buckets (one compilation per bucket),
run on the accelerator, and cached chunk by chunk. Progress bars show images/s and ETA.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from scvnet_jax.api import RetrievalModel
from scvnet_jax.data import batching, normalize
from scvnet_jax.data.revisitop import CVNET_SCALES, ImageRef, cvnet_scales, read_image
from scvnet_jax.evaluation.cache import ChunkCache


@dataclasses.dataclass(frozen=True)
class CVNetGlobal:
    """CVNet-Global as the official test: each scale (OpenCV-resized) gives an L2-normalised
    descriptor; their mean is L2-normalised."""
    scales: tuple = CVNET_SCALES
    name = "cvnet_global"

    def inputs(self, im: np.ndarray) -> list[np.ndarray]:
        return [normalize(x) for x in cvnet_scales(im, self.scales)]

    def run(self, model: RetrievalModel, batch: batching.PaddedBatch) -> np.ndarray:
        return np.asarray(model.global_descriptor(batch.images, batch.valid))

    def combine(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        parts = [p / max(np.linalg.norm(p), 1e-12) for p in parts]
        d = np.mean(parts, axis=0)
        return d / max(np.linalg.norm(d), 1e-12)


@dataclasses.dataclass(frozen=True)
class SuperGlobal:
    """SuperGlobal as the official test: the full image in, multi-scale resizing inside the
    model, the output L2-normalised."""
    scales: int = 3
    rgem: bool = True
    sgem: bool = True
    relup: bool = True
    gemp: bool = True
    name = "superglobal"

    def inputs(self, im: np.ndarray) -> list[np.ndarray]:
        return [normalize(im)]

    def run(self, model: RetrievalModel, batch: batching.PaddedBatch) -> np.ndarray:
        return np.asarray(model.superglobal_descriptor(
            batch.images, scales=self.scales, rgem=self.rgem, sgem=self.sgem, relup=self.relup,
            gemp=self.gemp, valid=batch.valid))

    def combine(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        (d,) = parts
        return d / max(np.linalg.norm(d), 1e-12)


def _read_all(pool: ThreadPoolExecutor, refs: Sequence[ImageRef]) -> list[np.ndarray]:
    return list(pool.map(read_image, refs))


def extract(model: RetrievalModel, refs: Sequence[ImageRef], spec, *, batch_size: int = 8,
            bucket: int = 64, cache: ChunkCache | None = None, chunk_size: int = 256,
            workers: int = 4, desc: str = "extract") -> np.ndarray:
    """Descriptors (N, D) float32 of `refs` with `spec` (CVNetGlobal or SuperGlobal)."""
    chunk_size = cache.chunk_size if cache is not None else chunk_size
    n = len(refs)
    out = np.zeros((n, model.module.reduction_dim), np.float32)
    with tqdm(total=n, desc=desc, unit="img", dynamic_ncols=True, mininterval=2.0) as bar, \
            ThreadPoolExecutor(workers) as pool:
        for c, start in enumerate(range(0, n, chunk_size)):
            stop = min(n, start + chunk_size)
            cached = cache.get(c, stop - start) if cache is not None else None
            if cached is not None:
                out[start:stop] = cached
                bar.update(stop - start)
                continue
            images = _read_all(pool, refs[start:stop])
            items, parts_left = [], {}
            for i, im in enumerate(images):
                xs = spec.inputs(im)
                parts_left[i] = len(xs)
                items += [((i, j), x) for j, x in enumerate(xs)]
            parts: dict = {i: [None] * k for i, k in parts_left.items()}
            for batch in batching.padded_batches(items, batch_size, bucket):
                descs = spec.run(model, batch)
                done = 0
                for row, (i, j) in enumerate(batch.ids):
                    parts[i][j] = descs[row]
                    parts_left[i] -= 1
                    done += parts_left[i] == 0
                bar.update(done)
            chunk = np.stack([spec.combine(parts[i]) for i in range(stop - start)])
            out[start:stop] = chunk
            if cache is not None:
                cache.put(c, chunk)
    return out


def verification_scores(model: RetrievalModel, query_refs: Sequence[ImageRef],
                        db_refs: Sequence[ImageRef], candidates: Sequence[np.ndarray], *,
                        batch_size: int = 8, bucket: int = 64, feature_bucket: int = 4,
                        key_chunk: int = 32, cache: ChunkCache | None = None,
                        workers: int = 4, desc: str = "cvnet rerank") -> np.ndarray:
    """CVNet-Rerank scores for (candidates[i][j], query i) -> (n_db, n_q), NaN elsewhere.

    Local features are computed at scale 1 (as the official test), once per query and once
    per database image (the official code recomputes them for every query); pairs are then
    scored in batches grouped by feature size, padded up to multiples of `feature_bucket`
    cells, so one compilation serves many pair sizes. Finished pairs are cached in chunks
    (any grouping: a pair's score does not depend on it), so an interrupted run resumes.
    """
    scores = np.full((len(db_refs), len(query_refs)), np.nan, np.float32)
    wanted = {(int(d), qi) for qi, cand in enumerate(candidates) for d in cand}
    done, next_chunk = _cached_pairs(cache)
    todo = sorted(p for p in wanted if p not in done)
    with tqdm(total=len(wanted), desc=desc, unit="pair", dynamic_ncols=True,
              mininterval=2.0) as bar, ThreadPoolExecutor(workers) as pool:
        bar.update(len(wanted) - len(todo))
        queries = sorted({q for _, q in todo})
        qfeat = dict(zip(queries, _local_features(
            model, _read_all(pool, [query_refs[q] for q in queries]), batch_size, bucket)))
        keys = sorted({d for d, _ in todo})
        by_key: dict[int, list[int]] = {}
        for d, q in todo:
            by_key.setdefault(d, []).append(q)
        for start in range(0, len(keys), key_chunk):
            chunk = keys[start:start + key_chunk]
            kfeat = dict(zip(chunk, _local_features(
                model, _read_all(pool, [db_refs[d] for d in chunk]), batch_size, bucket)))
            pairs = [((d, q), qfeat[q], kfeat[d]) for d in chunk for q in by_key[d]]
            new = _score_pairs(model, pairs, batch_size, feature_bucket, bar)
            done.update(new)
            if cache is not None:
                cache.put(next_chunk, np.array(
                    [(d, q, s) for (d, q), s in new.items()], np.float64).reshape(-1, 3))
                next_chunk += 1
    for (d, q) in wanted:
        scores[d, q] = done[(d, q)]
    return scores


def _cached_pairs(cache: ChunkCache | None) -> tuple[dict, int]:
    """Scores of the pairs finished by earlier runs, and the next free chunk index."""
    done, i = {}, 0
    while cache is not None and (arr := cache.get(i)) is not None:
        done.update({(int(d), int(q)): float(s) for d, q, s in arr})
        i += 1
    return done, i


def _local_features(model: RetrievalModel, images: list[np.ndarray], batch_size: int,
                    bucket: int) -> list[np.ndarray]:
    """Local features of each image, cropped to its valid size (host arrays)."""
    out: list = [None] * len(images)
    items = [(i, normalize(im)) for i, im in enumerate(images)]
    for batch in batching.padded_batches(items, batch_size, bucket):
        feats = np.asarray(model.local_features(batch.images, batch.valid))
        for row, (i, (h, w)) in enumerate(zip(batch.ids, model.feature_valid(batch.valid))):
            out[i] = feats[row, :h, :w]
    return out


def _score_pairs(model: RetrievalModel, pairs, batch_size: int, feature_bucket: int, bar):
    """{pair id: score} for (id, query features, key features) triples."""
    groups: dict = {}
    for pid, fq, fk in pairs:
        shape = (batching.bucket_hw(*fq.shape[:2], feature_bucket),
                 batching.bucket_hw(*fk.shape[:2], feature_bucket))
        groups.setdefault(shape, []).append((pid, fq, fk))
    out = {}
    for (qb, kb), members in groups.items():
        for start in range(0, len(members), batch_size):
            part = members[start:start + batch_size]
            fq = batching.pad_stack([m[1] for m in part], batch_size, qb)
            fk = batching.pad_stack([m[2] for m in part], batch_size, kb)
            s = np.asarray(model.verification_score_from_features(fq.images, fk.images,
                                                                  fq.valid, fk.valid))
            for row, (pid, _, _) in enumerate(part):
                out[pid] = float(s[row])
            bar.update(len(part))
    return out
