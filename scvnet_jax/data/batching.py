"""Batches of images of different sizes, padded into size buckets.

Each image is padded at the bottom/right with zeros to its bucket, (h, w) rounded up to a
multiple of `multiple` pixels, and batches are filled to a fixed size with dummy entries,
so the number of compilations is the number of buckets, not the number of image sizes.
Together with the models' `valid` handling the results equal the unpadded computation.

`multiple="auto"` (AUTO) chooses the padded shapes from the data instead (`auto_shapes`):
sizes are merged into one shape while the pixels the padding adds cost less than compiling
one more program would (`AUTO_COMPILE_COST`), reusing the shapes this process already used,
so a folder of photos of mixed sizes compiles about as few programs as one of a single size.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from scvnet_jax.errors import InputError

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


AUTO = "auto"
# What compiling one more program costs, in the units of CPU_BUDGET (pixels, feature
# cells, correlation cells) of work it would save: a size is padded into a larger shape
# while the padding costs less. On a 2-core CPU one backbone program of the demo model
# (width 16) compiles in ~2.2-2.6 CPU s, the time of ~8-11 M of its pixels, and a CVNet
# rerank pair program in ~1.8-2.1 CPU s, ~17-19 M correlation cells (scoring the mixed
# photos of benchmarks/buckets.py: 1 << 23, 24, 25 took 81, 70, 74 CPU s; docs/evaluation.md);
# an accelerator computes ~100x faster but compiles as slowly.
# "images" is for a backbone of width 16; `image_compile_cost` scales it to others.
AUTO_COMPILE_COST = {"cpu": {"images": 1 << 23, "features": 1 << 15, "pairs": 1 << 24},
                     "accelerator": {"images": 1 << 28, "features": 1 << 20, "pairs": 1 << 30}}
AUTO_WIDTH = 16
AUTO_MAX_SIZES = 64   # distinct sizes clustered exactly (more: sizes are first rounded up)
_auto_seen: dict = {}  # (what, program, ndim) -> shapes already used with AUTO by this process


def parse_bucket(text) -> int | str:
    """A bucket setting: an integer >= 1 or "auto"; InputError for anything else."""
    if isinstance(text, str) and text.strip().lower() == AUTO:
        return AUTO
    if isinstance(text, bool):
        raise InputError(f"expected an integer >= 1 or 'auto', got {text!r}")
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise InputError(f"expected an integer >= 1 or 'auto', got {text!r}") from None
    if v < 1 or (isinstance(text, float) and v != text):
        raise InputError(f"expected an integer >= 1 or 'auto', got {text!r}")
    return v


def _compile_cost(what: str) -> int:
    import jax
    return AUTO_COMPILE_COST["cpu" if jax.default_backend() == "cpu" else "accelerator"][what]


def image_compile_cost(width: int) -> int:
    """`AUTO_COMPILE_COST`'s "images" for a ResNet backbone of `width` (first-stage
    channels): a pixel's work grows about as width^1.5 relative to a program's compile
    time (measured on 2 cores, one SuperGlobal scale at 300x420-640x480: width 16 compiles
    in the time of 8-11 M pixels, width 64 in that of 1.2-1.3 M)."""
    return max(1, int(_compile_cost("images") * (AUTO_WIDTH / max(1, int(width))) ** 1.5))


def auto_shapes(sizes, what: str = "images", compile_cost: int | None = None,
                seen=None, program: str = "") -> dict:
    """{size: padded shape} for `sizes` (tuples of ints, e.g. (h, w), or (hq, wq, hk, wk)
    for rerank pairs; repeats count): greedy agglomerative merging of sizes into shapes
    (each the elementwise max of its members) while a merge lowers
    `compile_cost` x (new shapes) + sum over items of prod(shape). Shapes in `seen` (default:
    those this process used for `what` and `program`, which it then extends; programs that
    differ, such as CVNet-Global's and SuperGlobal's, each compile their own) cost no
    compilation."""
    counts: dict = {}
    for s in sizes:
        s = tuple(int(v) for v in s)
        counts[s] = counts.get(s, 0) + 1
    if not counts:
        return {}
    ndim = len(next(iter(counts)))
    if compile_cost is None:
        compile_cost = _compile_cost(what)
    track = seen is None
    if track:
        seen = _auto_seen.setdefault((what, program, ndim), set())
    seen = set(seen)
    # too many distinct sizes: round them up to multiples of q first (still exact)
    q, keys = 1, dict.fromkeys(counts, None)
    while True:
        keys = {s: tuple(-(-v // q) * q for v in s) for s in counts}
        if len(set(keys.values())) <= AUTO_MAX_SIZES:
            break
        q *= 2
    clusters: dict = {}
    for s, k in keys.items():
        clusters[k] = clusters.get(k, 0) + counts[s]
    area = lambda shape: int(np.prod(shape, dtype=np.int64))  # noqa: E731

    def fits(size, shape):
        return all(a <= b for a, b in zip(size, shape))

    def own_cost(shape, n):
        return (0 if shape in seen else compile_cost) + n * area(shape)

    def home(shape, n):
        """shape, or the cheapest seen shape that holds it if that costs less."""
        best = min((t for t in seen if fits(shape, t)), key=area, default=None)
        if best is not None and n * area(best) < own_cost(shape, n):
            return best
        return shape

    groups: list = []   # [shape, count]
    for k, n in clusters.items():
        shape = home(k, n)
        for g in groups:
            if g[0] == shape:
                g[1] += n
                break
        else:
            groups.append([shape, n])
    while len(groups) > 1:
        best = None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                (a, na), (b, nb) = groups[i], groups[j]
                merged = home(tuple(max(x, y) for x, y in zip(a, b)), na + nb)
                delta = own_cost(merged, na + nb) - own_cost(a, na) - own_cost(b, nb)
                if best is None or delta < best[0]:
                    best = (delta, i, j, merged)
        if best[0] >= 0:
            break
        _, i, j, merged = best
        n = groups[i][1] + groups[j][1]
        groups = [g for t, g in enumerate(groups) if t not in (i, j)] + [[merged, n]]
    shapes = sorted({g[0] for g in groups}, key=area)
    if track:
        _auto_seen[(what, program, ndim)].update(shapes)
    # every size goes to the smallest chosen shape that holds it
    return {s: min((t for t in shapes if fits(s, t)), key=area) for s in counts}


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


def padded_batches(items: Sequence, batch_size: int, multiple: int | str, devices: int = 1,
                   what: str = "images", program: str = "",
                   compile_cost: int | None = None) -> Iterator[PaddedBatch]:
    """Groups (id, HWC array) pairs by bucket (first-seen order; `multiple` AUTO: the
    shapes `auto_shapes` chooses for these items, `program` and `compile_cost`) into padded
    batches of `batch_size` rows per device (0: auto for the bucket's size, see
    `default_batch_size`), over `devices` devices; a bucket with fewer items gets fewer
    rows (`batch_rows`). All batches of a bucket have the same rows, so each bucket
    compiles one program."""
    groups: dict[tuple[int, int], list] = {}
    items = list(items)
    if multiple == AUTO:
        chosen = auto_shapes([arr.shape[:2] for _, arr in items], what, compile_cost,
                             program=program)
        shape_of = lambda h, w: chosen[(h, w)]  # noqa: E731
    else:
        shape_of = lambda h, w: bucket_hw(h, w, multiple)  # noqa: E731
    for item_id, arr in items:
        groups.setdefault(shape_of(arr.shape[0], arr.shape[1]), []).append((item_id, arr))
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
