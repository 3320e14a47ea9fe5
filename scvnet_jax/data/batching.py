"""Batches of images of different sizes, padded into size buckets.

Each image is padded at the bottom/right with zeros to its bucket, (h, w) rounded up to a
multiple of `multiple` pixels, and batches are filled to a fixed size with dummy entries,
so the number of compilations is the number of buckets, not the number of image sizes.
Together with the models' `valid` handling the results equal the unpadded computation.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np


# Items per device per batch when none is given (batch_size 0 = auto, everywhere): a CPU
# core gains nothing from large batches (per-image time at batch 8 is a quarter above batch
# 1-2 on the 2-core machine, and a group smaller than the batch pays for its dummy rows);
# accelerators want them. Measured with benchmarks/vs_official.py (README, Speed).
CPU_BATCH = {"images": 1, "pairs": 1}
ACCELERATOR_BATCH = {"images": 8, "pairs": 8}


def default_batch_size(what: str = "images") -> int:
    """The per-device batch for `what` ("images" or "pairs") on this process's backend."""
    import jax
    return (CPU_BATCH if jax.default_backend() == "cpu" else ACCELERATOR_BATCH)[what]


def resolve_batch_size(batch_size: int | None, what: str = "images") -> int:
    """`batch_size` if >= 1, else (0 or None: auto) `default_batch_size(what)`."""
    return int(batch_size) if batch_size and batch_size > 0 else default_batch_size(what)


def batch_rows(count: int, batch_size: int, devices: int = 1) -> int:
    """Rows of a batch holding `count` (<= batch_size) real items: a full batch, or for a
    smaller group the next power of two per device, so dummy rows at most double the work
    and a bucket compiles at most log2(batch_size / devices) + 1 programs."""
    per_device = -(-count // devices)
    return min(batch_size, devices * (1 << max(0, per_device - 1).bit_length()))


def bucket_hw(h: int, w: int, multiple: int) -> tuple[int, int]:
    """(h, w) rounded up to multiples of `multiple` (<= 1: unchanged)."""
    if multiple <= 1:
        return int(h), int(w)
    return -(-int(h) // multiple) * multiple, -(-int(w) // multiple) * multiple


@dataclasses.dataclass
class PaddedBatch:
    ids: list            # caller's ids of the real entries (the first len(ids) rows)
    images: np.ndarray   # (batch_size, H, W, C) float32, zero-padded
    valid: np.ndarray    # (batch_size, 2) int32 valid (h, w); dummies are full-size


def padded_batches(items: Sequence, batch_size: int, multiple: int,
                   devices: int = 1) -> Iterator[PaddedBatch]:
    """Groups (id, HWC array) pairs by bucket (first-seen order) into padded batches of
    `batch_size` rows (the last of a bucket: `batch_rows`, a multiple of `devices`)."""
    groups: dict[tuple[int, int], list] = {}
    for item_id, arr in items:
        groups.setdefault(bucket_hw(arr.shape[0], arr.shape[1], multiple), []).append(
            (item_id, arr))
    for hw, members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            rows = batch_rows(len(chunk), batch_size, devices)
            batch = pad_stack([arr for _, arr in chunk], rows, hw)
            batch.ids = [i for i, _ in chunk]
            yield batch


def pad_stack(arrays: Sequence[np.ndarray], batch_size: int, hw: tuple[int, int]) -> PaddedBatch:
    """Zero-pads (H, W, ...) arrays to `hw` and stacks them into `batch_size` rows (dummy
    rows are zeros marked full-size valid)."""
    bh, bw = hw
    images = np.zeros((batch_size, bh, bw) + arrays[0].shape[2:], np.float32)
    valid = np.tile(np.array([[bh, bw]], np.int32), (batch_size, 1))
    for row, arr in enumerate(arrays):
        images[row, :arr.shape[0], :arr.shape[1]] = arr
        valid[row] = arr.shape[:2]
    return PaddedBatch(list(range(len(arrays))), images, valid)
