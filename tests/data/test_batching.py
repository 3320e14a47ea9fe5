"""Batch sizes: auto per backend, and partial batches padded to a power of two (not to the
full batch), so a small group does not pay for a whole batch of dummy rows."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from scvnet_jax.data import batching


def test_auto_batch_size_follows_the_backend_and_the_size():
    """Accelerators: 8. A CPU: as many items as fit the work budget, a power of two, 1-8:
    one ROxford-size image or pair, eight of the demo's small ones."""
    if jax.default_backend() != "cpu":
        assert batching.resolve_batch_size(0, "images", 96 * 96) == 8
        return
    auto = batching.resolve_batch_size
    assert auto(0, "images", 768 * 1024) == 1 and auto(0, "images", 512 * 512) == 2
    assert auto(0, "images", 160 * 160) == 8 and auto(None, "images") == 1
    assert auto(0, "features", 48 * 64) == 1 and auto(0, "features", 10 * 10) == 8
    assert auto(0, "pairs", (48 * 64) ** 2) == 1 and auto(0, "pairs", 100 ** 2) == 8
    assert auto(5, "pairs", 10) == 5 and auto(3, "images", 10 ** 7) == 3


@pytest.mark.parametrize("count, size, devices, rows", [
    (8, 8, 1, 8), (5, 8, 1, 8), (3, 8, 1, 4), (2, 8, 1, 2), (1, 8, 1, 1), (30, 8, 1, 8),
    (1, 16, 8, 8), (9, 16, 8, 16), (3, 12, 1, 4), (5, 6, 1, 6),
])
def test_batch_rows(count, size, devices, rows):
    got = batching.batch_rows(count, size, devices)
    assert got == rows and got % devices == 0 and min(count, size) <= got <= size


def test_padded_batches_use_few_dummy_rows_and_one_shape_per_bucket():
    items = [(i, np.ones((30 + i, 40, 3), np.float32)) for i in range(11)]      # one bucket
    items += [(20 + i, np.ones((100, 40, 3), np.float32)) for i in range(3)]    # another
    batches = list(batching.padded_batches(items, 8, 64))
    assert [len(b.ids) for b in batches] == [8, 3, 3]
    assert [b.images.shape[0] for b in batches] == [8, 8, 4]    # 11: 8 + 8; 3 alone: 4
    last = batches[1]
    assert last.ids == [8, 9, 10] and last.valid[:3].tolist() == [[38, 40], [39, 40], [40, 40]]
    assert not last.images[3:].any()          # the dummy rows
    both = list(batching.padded_batches(items[:11], 8, 64, devices=2))   # 8 per device
    assert [len(b.ids) for b in both] == [11] and both[0].images.shape[0] == 16


def test_auto_shapes_are_few_and_hold_every_size():
    """Issue 35 DM4: bucket "auto" pads 300 photos of mixed sizes into a handful of shapes
    (each holding its images), merging only while the padding costs less than a compile."""
    rng = np.random.default_rng(0)
    sizes = [tuple(rng.integers(300, 1025, 2)) for _ in range(300)]
    chosen = batching.auto_shapes(sizes, "images", compile_cost=1 << 23, seen=set())
    assert all(s[0] <= t[0] and s[1] <= t[1] for s, t in chosen.items())
    assert len(set(chosen.values())) <= 8
    # compiling costs nothing: every size its own shape; costs everything: one shape
    assert len(set(batching.auto_shapes(sizes, "images", 0, seen=set()).values())) > 8
    (one,) = set(batching.auto_shapes(sizes, "images", 1 << 40, seen=set()).values())
    assert 1024 <= min(one) <= 1024 + 64   # (300 distinct sizes are first rounded up)
    # a shape already used is reused by smaller sizes (no compilation), 4-D pairs likewise
    assert batching.auto_shapes([(30, 40)], "images", 1 << 20, seen={(64, 64)}) == {
        (30, 40): (64, 64)}
    pairs = [tuple(rng.integers(5, 65, 4)) for _ in range(500)]
    assert len(set(batching.auto_shapes(pairs, "pairs", 1 << 25, seen=set()).values())) <= 16


def test_padded_batches_auto(monkeypatch):
    monkeypatch.setattr(batching, "_auto_seen", {})
    items = [(i, np.ones((100 + 7 * i, 160 - 5 * i, 3), np.float32)) for i in range(12)]
    batches = list(batching.padded_batches(items, 4, "auto"))
    assert {b.images.shape[1:3] for b in batches} == {(177, 160)}
    assert sorted(i for b in batches for i in b.ids) == list(range(12))
    assert batching.parse_bucket("auto") == "auto" and batching.parse_bucket("64") == 64
    for bad in ("0", "x", "1.5", 0, True):
        with pytest.raises(ValueError, match="integer >= 1 or 'auto'"):
            batching.parse_bucket(bad)
