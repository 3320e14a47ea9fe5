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


def padded_batches(items: Sequence, batch_size: int, multiple: int) -> Iterator[PaddedBatch]:
    """Groups (id, HWC array) pairs by bucket (first-seen order) into padded batches of
    exactly `batch_size` rows."""
    groups: dict[tuple[int, int], list] = {}
    for item_id, arr in items:
        groups.setdefault(bucket_hw(arr.shape[0], arr.shape[1], multiple), []).append(
            (item_id, arr))
    for hw, members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            batch = pad_stack([arr for _, arr in chunk], batch_size, hw)
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
