"""CVNet-Rerank verification scores for (query, database image) pairs.

Local features are computed at scale 1 (as the official test), and from them the verifier's
per-image half (`corr_features`: the three compressed, normalised scales), once per query
and once per database image (the official code recomputes both for every pair; a database
image that is also a query, uncropped, reuses the query's); pairs are
then scored (correlation + CVLearner) in batches grouped by feature size, padded up to
multiples of `feature_bucket` cells, so one compilation serves many pair sizes, and split
over the devices like extraction. With
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
                        batch_size: int = 0, bucket: int = 64, feature_bucket: int = 4,
                        key_chunk: int = 32, cache: ChunkCache | None = None,
                        workers: int = 4, desc: str = "cvnet rerank",
                        max_side: int = 0) -> np.ndarray:
    """CVNet-Rerank scores for (candidates[i][j], query i) -> (n_db, n_q), NaN elsewhere.
    batch_size: pairs (and images) per device per batch (0: `batching.default_batch_size`).
    max_side: the working size of the verifier's local features: images with a longer side
    are reduced to it (0: the images' working size, `images.max_side()`, as the global
    descriptors). A head trained on small views (configs/demo_rerank.py: 160 px) verifies
    large photos best at its training size."""
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
        def features(refs):
            if not refs:
                return []
            local = local_features(model, read_all(pool, refs, max_side or None), batch_size,
                                   bucket)
            return corr_features(model, local, batch_size, feature_bucket)

        qfeat = dict(zip(queries, features([query_refs[q] for q in queries])))
        # a key that is one of these queries' images (same file, no crop box: a folder
        # set's leave-one-out queries) reuses its features
        as_query = {query_refs[q]: q for q in queries if query_refs[q].bbx is None}
        for chunk in key_chunks:
            kfeat = {d: qfeat[as_query[db_refs[d]]] for d in chunk if db_refs[d] in as_query}
            rest = [d for d in chunk if d not in kfeat]
            kfeat.update(zip(rest, features([db_refs[d] for d in rest])))
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


def corr_features(model: RetrievalModel, features: Sequence[np.ndarray], batch_size: int,
                  feature_bucket: int) -> list[np.ndarray]:
    """`RetrievalModel.corr_features` of each (h, w, C) local-feature map, in padded batches
    -> (h, w, 3, corr_dim) host arrays."""
    out: list = [None] * len(features)
    for batch in batching.padded_batches(list(enumerate(features)), batch_size,
                                         feature_bucket, model.num_devices, "features"):
        cf = np.asarray(model.corr_features(batch.images, batch.valid))
        for row, (i, (h, w)) in enumerate(zip(batch.ids, batch.valid)):
            out[i] = cf[row, :h, :w]
    return out


def score_pairs(model: RetrievalModel, pairs, batch_size: int, feature_bucket: int, bar=None):
    """{pair id: score} for (id, query, key) triples of `corr_features` outputs."""
    groups: dict = {}
    if feature_bucket == batching.AUTO:
        chosen = batching.auto_shapes([cq.shape[:2] + ck.shape[:2] for _, cq, ck in pairs],
                                      "pairs")
    for pid, cq, ck in pairs:
        if feature_bucket == batching.AUTO:
            s = chosen[cq.shape[:2] + ck.shape[:2]]
            shape = (s[:2], s[2:])
        else:
            shape = (batching.bucket_hw(*cq.shape[:2], feature_bucket),
                     batching.bucket_hw(*ck.shape[:2], feature_bucket))
        groups.setdefault(shape, []).append((pid, cq, ck))
    out = {}
    for (qb, kb), members in groups.items():
        cells = qb[0] * qb[1] * kb[0] * kb[1]
        size = batching.resolve_batch_size(batch_size, "pairs", cells) * model.num_devices
        rows = batching.batch_rows(len(members), size, model.num_devices)
        for start in range(0, len(members), rows):
            part = members[start:start + rows]
            cq = batching.pad_stack([m[1] for m in part], rows, qb)
            ck = batching.pad_stack([m[2] for m in part], rows, kb)
            s = np.asarray(model.verification_score_from_corr_features(
                cq.images, ck.images, cq.valid, ck.valid))
            for row, (pid, _, _) in enumerate(part):
                out[pid] = float(s[row])
            if bar is not None:
                bar.update(len(part))
    return out
