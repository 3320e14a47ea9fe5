"""On-disk caches of descriptors and verification scores: atomic and resumable.

A cache lives in `<cache_dir>/<kind>-<hash of its key>/`, where the key is everything the
stored values depend on (weights fingerprint, dtype, dataset fingerprint, image list,
extraction settings, format version), so a changed setting lands in a new directory and
never reuses stale values. Values are written in chunks, each atomically (temporary file,
then rename): a run killed midway keeps every finished chunk, and the next run with the
same settings only computes the rest.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

FORMAT_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes `data` to `path` via a temporary file and a rename: readers see the old file
    or the new one, never a partial one. The file gets the usual 0666 & ~umask mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save_npz(path: Path, **arrays) -> None:
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def weights_fingerprint(variables) -> str:
    """sha256 over every variable's path, dtype, shape and bytes (format-independent: a
    .pyth file and its converted directory give the same fingerprint)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def list_fingerprint(items) -> str:
    return hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()


class ChunkCache:
    """Chunks of rows (chunk i holds rows [i*chunk_size, (i+1)*chunk_size)) of one array."""

    def __init__(self, cache_dir, kind: str, key: Mapping[str, Any], chunk_size: int):
        key = {"format": FORMAT_VERSION, "kind": kind, "chunk_size": chunk_size, **key}
        text = json.dumps(key, sort_keys=True)
        self.dir = Path(cache_dir) / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"
        self.chunk_size = chunk_size
        self.key = key
        meta = self.dir / "key.json"
        if not meta.exists():
            atomic_write_bytes(meta, (json.dumps(key, indent=1, sort_keys=True) + "\n").encode())

    def _path(self, i: int) -> Path:
        return self.dir / f"chunk_{i:06d}.npy"

    def get(self, i: int, rows: int | None = None) -> np.ndarray | None:
        """Chunk i if present (and, if `rows` is given, whole), else None."""
        path = self._path(i)
        if not path.exists():
            return None
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # unreadable: recompute
        return arr if rows is None or arr.shape[0] == rows else None

    def put(self, i: int, arr: np.ndarray) -> None:
        import io
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        atomic_write_bytes(self._path(i), buf.getvalue())
