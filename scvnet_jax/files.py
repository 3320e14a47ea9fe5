"""File writes that never leave a partial file, and content fingerprints.

Every file this package writes for a user (results, caches, indexes, model directories,
hard-negative tables) goes through here: into a temporary sibling first, then renamed over
the target, so a reader sees the old file or the new one and a killed process leaves no
half-written file behind.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from scvnet_jax.errors import OutputError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Writes `data` to `path` via a temporary file and a rename. The file gets the usual
    0666 & ~umask mode."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:   # disk full, read-only, no permission: one clear error
        raise OutputError(f"{path}: cannot write it ({e.strerror or e}); nothing was "
                          "written") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_save_npy(path, array: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_save_npz(path, **arrays) -> Path:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def staging_dir(out: Path) -> Path:
    """A fresh hidden sibling of `out` to build a directory in before `replace_dir`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))


def replace_dir(tmp: Path, out: Path) -> Path:
    """Moves the finished directory `tmp` to `out`, replacing what was there (an older
    version of the same artefact; callers check that it is theirs to replace)."""
    out = Path(out)
    if out.is_dir() and not out.is_symlink():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "d")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.exists() or out.is_symlink():
            out.unlink()
        os.replace(tmp, out)
    return out


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def list_fingerprint(items) -> str:
    """sha256 of a list of strings (one per line)."""
    return sha256_text("\n".join(map(str, items)))
