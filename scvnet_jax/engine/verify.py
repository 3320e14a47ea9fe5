"""CVNet-Rerank verification scores for (query, database image) pairs.

Local features are computed at scale 1 (as the official test), once per query and once per
database image (the official code recomputes them for every query); pairs are then scored
in batches grouped by feature size, padded up to multiples of `feature_bucket` cells, so
one compilation serves many pair sizes, and split over the devices like extraction. With
several processes, database chunk i is handled by process i % process_count and the scores
are gathered. Finished pairs are cached (any grouping: a pair's score does not depend on
it), so an interrupted run resumes.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from scvnet_jax import mesh
from scvnet_jax.api import RetrievalModel
from scvnet_jax.data import batching
from scvnet_jax.engine.cache import ChunkCache
from scvnet_jax.engine.extract import local_features, read_all
from scvnet_jax.images import ImageRef


def verification_scores(model: RetrievalModel, query_refs: Sequence[ImageRef],
                        db_refs: Sequence[ImageRef], candidates: Sequence[np.ndarray], *,
                        batch_size: int = 8, bucket: int = 64, feature_bucket: int = 4,
                        key_chunk: int = 32, cache: ChunkCache | None = None,
                        workers: int = 4, desc: str = "cvnet rerank") -> np.ndarray:
    """CVNet-Rerank scores for (candidates[i][j], query i) -> (n_db, n_q), NaN elsewhere.
    batch_size: pairs (and images) per device per batch."""
    scores = np.full((len(db_refs), len(query_refs)), np.nan, np.float32)
    wanted = {(int(d), qi) for qi, cand in enumerate(candidates) for d in cand}
    done = cached_pairs(cache)
    todo = sorted(p for p in wanted if p not in done)
    keys = sorted({d for d, _ in todo})
    key_chunks = [keys[s:s + key_chunk] for s in range(0, len(keys), key_chunk)]
    key_chunks = [c for i, c in enumerate(key_chunks) if mesh.owner(i) == mesh.process_index()]
    by_key: dict[int, list[int]] = {}
    for d, q in todo:
        by_key.setdefault(d, []).append(q)
    new_rows = []
    with tqdm(total=len(wanted), desc=desc, unit="pair", dynamic_ncols=True, mininterval=2.0,
              disable=mesh.process_index() != 0) as bar, ThreadPoolExecutor(workers) as pool:
        bar.update(len(wanted) - len(todo))
        queries = sorted({q for c in key_chunks for d in c for q in by_key[d]})
        qfeat = dict(zip(queries, local_features(
            model, read_all(pool, [query_refs[q] for q in queries]), batch_size, bucket)))
        for chunk in key_chunks:
            kfeat = dict(zip(chunk, local_features(
                model, read_all(pool, [db_refs[d] for d in chunk]), batch_size, bucket)))
            pairs = [((d, q), qfeat[q], kfeat[d]) for d in chunk for q in by_key[d]]
            new = score_pairs(model, pairs, batch_size, feature_bucket, bar)
            rows = np.array([(d, q, s) for (d, q), s in new.items()], np.float64).reshape(-1, 3)
            if cache is not None:
                cache.add(rows)
            new_rows.append(rows)
    gathered = mesh.allgather_rows(np.concatenate(new_rows) if new_rows
                                   else np.zeros((0, 3), np.float64))
    done.update({(int(d), int(q)): float(s) for d, q, s in gathered})
    for (d, q) in wanted:
        scores[d, q] = done[(d, q)]
    return scores


def cached_pairs(cache: ChunkCache | None) -> dict:
    """Scores of the pairs finished by earlier runs."""
    done = {}
    for arr in (cache.records() if cache is not None else ()):
        done.update({(int(d), int(q)): float(s) for d, q, s in arr})
    return done


def score_pairs(model: RetrievalModel, pairs, batch_size: int, feature_bucket: int, bar=None):
    """{pair id: score} for (id, query features, key features) triples."""
    groups: dict = {}
    for pid, fq, fk in pairs:
        shape = (batching.bucket_hw(*fq.shape[:2], feature_bucket),
                 batching.bucket_hw(*fk.shape[:2], feature_bucket))
        groups.setdefault(shape, []).append((pid, fq, fk))
    rows = batch_size * model.num_devices
    out = {}
    for (qb, kb), members in groups.items():
        for start in range(0, len(members), rows):
            part = members[start:start + rows]
            fq = batching.pad_stack([m[1] for m in part], rows, qb)
            fk = batching.pad_stack([m[2] for m in part], rows, kb)
            s = np.asarray(model.verification_score_from_features(fq.images, fk.images,
                                                                  fq.valid, fk.valid))
            for row, (pid, _, _) in enumerate(part):
                out[pid] = float(s[row])
            if bar is not None:
                bar.update(len(part))
    return out
