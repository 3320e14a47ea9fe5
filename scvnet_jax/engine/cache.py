"""On-disk caches of descriptors and verification scores: atomic and resumable.

A cache lives in `<cache_dir>/<kind>-<hash of its key>/`, where the key is everything the
stored values depend on (a fingerprint of the weights that produce them, dtype, the image
list, extraction settings, the working size images are read at, format version), so a
changed setting lands in a new directory
and never reuses stale values. What the images hold is checked too: each descriptor chunk
stores the content digests (`images.content_digest`) of the files it came from and is used
only if they still match, so a photograph replaced under the same name is recomputed;
verification scores are keyed by the digests of every image involved. Descriptors are
keyed by the *backbone* only (the rerank head does not change them), so a model that
differs only in its head reuses them. Values are written in chunks, each atomically: a run
killed midway keeps every finished chunk, and the next run with the same settings only
computes the rest.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from scvnet_jax import files, images
from scvnet_jax.images import content_digest

FORMAT_VERSION = 3
BACKBONE = "encoder_q"


def weights_fingerprint(variables, part: str | None = None) -> str:
    """sha256 over every variable's path, dtype, shape and bytes (format-independent: a
    .pyth file and its converted directory give the same fingerprint). `part` (e.g.
    "encoder_q", the backbone) restricts it to that submodule of every collection."""
    if part is not None:
        variables = {c: tree[part] for c, tree in variables.items() if part in tree}
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def refs_fingerprint(refs) -> str:
    """Identifies an image list (files and query boxes) in cache keys."""
    return files.list_fingerprint(f"{r.path}|{r.bbx}" for r in refs)


def content_digests(refs, pool=None) -> list[str]:
    """The content digest of each image file (in a thread pool if given)."""
    paths = [r.path for r in refs]
    return list(pool.map(content_digest, paths) if pool is not None else
                map(content_digest, paths))


class ChunkCache:
    """Chunks of rows of one array: indexed chunks (`get`/`put`: chunk i holds rows
    [i*chunk_size, (i+1)*chunk_size)) or unordered record chunks (`add`/`records`)."""

    def __init__(self, cache_dir, kind: str, key: Mapping[str, Any], chunk_size: int):
        key = {"format": FORMAT_VERSION, "kind": kind, "chunk_size": chunk_size, **key}
        if images.max_side():       # values from images read reduced (0: full size, as before)
            key["max_side"] = images.max_side()
        text = json.dumps(key, sort_keys=True)
        self.dir = Path(cache_dir) / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"
        self.chunk_size = chunk_size
        self.key = key
        meta = self.dir / "key.json"
        if not meta.exists():
            files.atomic_write_text(meta, json.dumps(key, indent=1, sort_keys=True) + "\n")

    def _path(self, i) -> Path:
        return self.dir / (f"chunk_{i:06d}.npz" if isinstance(i, int) else f"chunk_{i}.npy")

    @staticmethod
    def _load(path: Path) -> np.ndarray | None:
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # unreadable: recompute

    def get(self, i: int, rows: int | None = None,
            sources: list[str] | None = None) -> np.ndarray | None:
        """Chunk i if present, whole (`rows`), and computed from files with these content
        digests (`sources`); else None."""
        path = self._path(i)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arr, stored = z["values"], [str(v) for v in z["sources"]]
        except (OSError, ValueError, KeyError, EOFError):
            return None  # unreadable: recompute
        if rows is not None and arr.shape[0] != rows:
            return None
        if sources is not None and stored != list(sources):
            return None  # an image changed since: recompute the chunk
        return arr

    def put(self, i: int, arr: np.ndarray, sources: list[str] | None = None) -> None:
        files.atomic_save_npz(self._path(i), values=arr,
                              sources=np.array(list(sources or []), dtype=np.str_))

    def add(self, arr: np.ndarray) -> None:
        """Stores a chunk of records under a fresh name (safe from several processes)."""
        files.atomic_save_npy(self._path(f"r_{uuid.uuid4().hex}"), arr)

    def records(self) -> Iterator[np.ndarray]:
        """Every readable chunk stored with `add`."""
        for path in sorted(self.dir.glob("chunk_r_*.npy")):
            arr = self._load(path)
            if arr is not None:
                yield arr
