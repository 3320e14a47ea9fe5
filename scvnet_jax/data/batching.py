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


# Items per device per batch when none is given (batch_size 0 = auto, everywhere).
# Accelerators want large batches: 8. A CPU core gains nothing from them on large inputs
# (per-image time at batch 8 is a quarter above batch 1-2 at 512x512 and 768x1024) but pays
# a call's overhead per item on small ones (the demo's 96-160 px images), so on a CPU a
# batch holds as many items as fit a work budget: a power of two from 1 to 8. Measured
# with benchmarks/vs_official.py (README, Benchmarks).
ACCELERATOR_BATCH = 8
CPU_MAX_BATCH = 8
CPU_BUDGET = {"images": 1 << 19,    # pixels: 768x1024 -> 1, 512x512 -> 2, 160x160 -> 8
              "features": 1 << 11,  # local-feature cells (pixels / 256): 48x64 -> 1
              "pairs": 1 << 20}     # 4-D correlation cells hq*wq*hk*wk: 48x64 pairs -> 1


def default_batch_size(what: str = "images", cost: int | None = None) -> int:
    """The per-device batch for items of `what` ("images", "features" or "pairs") whose
    size is `cost` (pixels, feature cells or correlation cells; None: unknown) on this
    process's backend."""
    import jax
    if jax.default_backend() != "cpu":
        return ACCELERATOR_BATCH
    if cost is None:
        return 1
    n = max(1, min(CPU_MAX_BATCH, CPU_BUDGET[what] // max(1, int(cost))))
    return 1 << (n.bit_length() - 1)


def resolve_batch_size(batch_size: int | None, what: str = "images",
                       cost: int | None = None) -> int:
    """`batch_size` if >= 1, else (0 or None: auto) `default_batch_size(what, cost)`."""
    return int(batch_size) if batch_size and batch_size > 0 else default_batch_size(what, cost)


def batch_rows(count: int, batch_size: int, devices: int = 1) -> int:
    """Rows of the batches of a group of `count` items of one shape: `batch_size`, or for a
    smaller group the next power of two per device (its dummy rows at most double the
    work). Every batch of the group has these rows: one compiled program per group."""
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


def padded_batches(items: Sequence, batch_size: int, multiple: int, devices: int = 1,
                   what: str = "images") -> Iterator[PaddedBatch]:
    """Groups (id, HWC array) pairs by bucket (first-seen order) into padded batches of
    `batch_size` rows per device (0: auto for the bucket's size, see `default_batch_size`),
    over `devices` devices; a bucket with fewer items gets fewer rows (`batch_rows`). All
    batches of a bucket have the same rows, so each bucket compiles one program."""
    groups: dict[tuple[int, int], list] = {}
    for item_id, arr in items:
        groups.setdefault(bucket_hw(arr.shape[0], arr.shape[1], multiple), []).append(
            (item_id, arr))
    for hw, members in groups.items():
        size = resolve_batch_size(batch_size, what, hw[0] * hw[1]) * devices
        rows = batch_rows(len(members), size, devices)
        for start in range(0, len(members), rows):
            chunk = members[start:start + rows]
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
