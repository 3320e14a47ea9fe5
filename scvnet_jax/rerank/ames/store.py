"""The database-token store: per image, by its content, what AMES keeps of it (tokens, or
packed codes), on disk; and the local descriptors it is made from, extracted only for the
images not stored yet."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from scvnet_jax.rerank.ames.model import AMESReranker, pack_codes


class TokenStore:
    """Content-keyed database tokens on disk: per image (by its content digest) what the
    decoder consumes (`AMESReranker.db_tokens`: float16 tokens of an fp model, packed bits of a
    dist model) and its number of real rows; keyed by everything they depend on (backbone,
    detector, AMES weights, topk, scales). One small file per image, written atomically:
    a killed run keeps every finished image."""

    def __init__(self, cache_dir, key: Mapping, kind: str = "ames-tokens"):
        from scvnet_jax.engine.cache import ChunkCache
        # the engine's cache gives the folder: named by a hash of the key, key.json inside
        self.dir = ChunkCache(cache_dir, kind, dict(key), 1).dir

    def _path(self, digest: str) -> Path:
        return self.dir / f"{digest}.npz"

    def get(self, digest: str):
        try:
            with np.load(self._path(digest), allow_pickle=False) as z:
                return z["tokens"], int(z["length"])
        except (OSError, ValueError, KeyError, EOFError):
            return None

    def put(self, digest: str, tokens: np.ndarray, length: int) -> None:
        from scvnet_jax import files
        files.atomic_save_npz(self._path(digest), tokens=tokens, length=np.int32(length))


def bytes_per_image(model: AMESReranker, db_len: int) -> int:
    """Bytes a database image takes in the token store (its db_len tokens + its length)."""
    per = (-(-model.arch.model_dim // 8) if model.arch.binarized else 2 * model.arch.model_dim)
    return int(db_len) * per + 4


def _db_tokens_of(model: AMESReranker, feats) -> np.ndarray:
    """Store format of LocalFeatures `feats`: packed bits (dist) or float16 tokens (fp)."""
    tokens = model.db_tokens(np.asarray(feats.desc, np.float32), feats.mask)
    return pack_codes(tokens) if model.arch.binarized else tokens


def database_tokens(model: AMESReranker, retrieval_model, refs, *, detector=None, topk: int = 50,
                    scales=None, cache_dir: str | None = None, batch_size: int = 0,
                    bucket: int = 64, workers: int = 4, desc: str = "ames db"):
    """(tokens (n, topk, ...), mask (n, topk) True = padding) of database images `refs` (topk:
    the database side's number of local descriptors, `db_len`), in
    the store format (`db_format` "packed" for dist models, "tokens" for fp), from the
    content-keyed `TokenStore` in cache_dir where present, else extracted (float32 local
    descriptors, exactly the official rows) and stored."""
    width = -(-model.arch.model_dim // 8) if model.arch.binarized else model.arch.model_dim
    return stored_local_rows(
        retrieval_model, refs, lambda feats: _db_tokens_of(model, feats),
        (width,), np.uint8 if model.arch.binarized else np.float16,
        {"token_format": 1, "ames": _fingerprint(model)}, detector=detector, topk=topk,
        scales=scales, cache_dir=cache_dir, batch_size=batch_size, bucket=bucket,
        workers=workers, desc=desc)


def stored_local_rows(retrieval_model, refs, convert, shape, dtype, key: Mapping, *,
                      detector=None, topk: int = 50, scales=None,
                      cache_dir: str | None = None, kind: str = "ames-tokens",
                      batch_size: int = 0, bucket: int = 64, workers: int = 4,
                      desc: str = "ames db"):
    """(rows (n, topk, *shape) `dtype`, mask (n, topk) True = padding) of images `refs`:
    `convert(LocalFeatures)` of their float32 local descriptors (`engine.local.extract_local`),
    from a content-keyed `TokenStore` (`kind`) in cache_dir where present, else extracted
    and stored. `key`: what the rows depend on besides the backbone, detector, topk, scales."""
    from concurrent.futures import ThreadPoolExecutor

    from scvnet_jax.engine import local
    from scvnet_jax.engine.cache import BACKBONE, content_digests, weights_fingerprint
    scales = tuple(scales or local.SCALES)
    n, topk = len(refs), int(topk)
    tokens = np.zeros((n, topk, *shape), dtype)
    length = np.zeros((n,), np.int64)
    store = digests = None
    todo = list(range(n))
    if cache_dir and n:
        key = {**key,
               "backbone": weights_fingerprint(retrieval_model.variables, BACKBONE),
               "model_dtype": jnp.dtype(retrieval_model.module.dtype).name,
               "precision": str(getattr(retrieval_model.module, "precision", None)),
               "detector": None if detector is None else detector.fingerprint,
               "topk": topk, "scales": [float(s) for s in scales]}
        store = TokenStore(cache_dir, key, kind)
        with ThreadPoolExecutor(workers) as pool:
            digests = content_digests(refs, pool)
        todo = []
        for i, dg in enumerate(digests):
            got = store.get(dg)
            if got is None or got[0].shape != tokens.shape[1:] or got[0].dtype != tokens.dtype:
                todo.append(i)
            else:
                tokens[i], length[i] = got
    step = 256                      # images per extraction call: stored as they finish
    for s in range(0, len(todo), step):
        part = todo[s:s + step]
        feats = local.extract_local(retrieval_model, [refs[i] for i in part], detector,
                                    topk, scales, batch_size, bucket=bucket,
                                    dtype=np.float32, workers=workers,
                                    desc=f"{desc} ({len(todo)} to extract)")
        toks = convert(feats)
        for row, i in enumerate(part):
            tokens[i], length[i] = toks[row], feats.length[row]
            if store is not None:
                store.put(digests[i], toks[row], int(feats.length[row]))
    mask = np.arange(topk)[None, :] >= length[:, None]
    return tokens, mask


def _fingerprint(model: AMESReranker) -> str:
    from scvnet_jax.engine.cache import weights_fingerprint
    if getattr(model, "_fp", None) is None:
        model._fp = weights_fingerprint(model.variables) + "|" + str(model.arch)
    return model._fp
