"""The training input pipeline: `tfds.data_source` (ArrayRecord, random access) read by grain,
no TensorFlow in the process.

Each element is a pair for the two encoders: `image` (for the trained encoder) and
`positive` (for the momentum encoder), both augmented crops; the positive is another image
of the same class (drawn uniformly; the image itself for a single-image class) or, with
`positive='same_image'`, a second augmentation of the same image. Everything random comes
from grain's per-element generator (seeded by the config seed and the element's position in
the stream), so the stream is the same on every run and a restored iterator continues it
exactly. Each process reads its own slice (`process_index::process_count`) of the shuffled,
repeated index stream and batches `global_batch / process_count` of it.

Images stay uint8 BGR on the host; normalisation happens on the accelerator.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import grain
import numpy as np

from scvnet_jax.data.revisitop import InputError


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation (all of it host-side NumPy/OpenCV)."""
    size: int = 512                    # output crops are size x size
    area: tuple[float, float] = (0.25, 1.0)    # random-resized-crop area fraction
    aspect: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5                 # probability
    brightness: float = 0.3            # relative, each applied with probability `color_p`
    contrast: float = 0.3
    saturation: float = 0.3
    color_p: float = 0.8
    grayscale: float = 0.0             # probability

    @classmethod
    def from_config(cls, c) -> "Augment":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(c).items()
              if k in fields}
        unknown = set(dict(c)) - fields
        if unknown:
            raise ValueError(f"unknown augmentation option(s) {sorted(unknown)}; known: "
                             f"{sorted(fields)}")
        return cls(**kw)


def decode(data: bytes, what: str) -> np.ndarray:
    import cv2

    im = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if im is None:
        raise InputError(f"{what}: cannot decode the stored image (corrupt JPEG?)")
    return im


def augment(im: np.ndarray, a: Augment, rng: np.random.Generator) -> np.ndarray:
    """Random-resized crop to a.size x a.size, flip, colour jitter; BGR uint8 in and out."""
    import cv2

    h, w = im.shape[:2]
    for _ in range(10):
        area = rng.uniform(*a.area) * h * w
        ar = math.exp(rng.uniform(math.log(a.aspect[0]), math.log(a.aspect[1])))
        cw, ch = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:  # fall back to the largest square
        cw = ch = min(h, w)
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    crop = im[y:y + ch, x:x + cw]
    interp = cv2.INTER_AREA if max(ch, cw) > a.size else cv2.INTER_LINEAR
    out = cv2.resize(crop, (a.size, a.size), interpolation=interp)
    if rng.random() < a.hflip:
        out = out[:, ::-1]
    if rng.random() < a.color_p:
        x = out.astype(np.float32)
        gray = x @ np.array([0.114, 0.587, 0.299], np.float32)
        x = x * (1 + rng.uniform(-a.brightness, a.brightness))
        c = 1 + rng.uniform(-a.contrast, a.contrast)
        x = (x - gray.mean()) * c + gray.mean()
        s = 1 + rng.uniform(-a.saturation, a.saturation)
        g = x @ np.array([0.114, 0.587, 0.299], np.float32)
        x = g[..., None] + s * (x - g[..., None])
        out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if rng.random() < a.grayscale:
        g = cv2.cvtColor(np.ascontiguousarray(out), cv2.COLOR_BGR2GRAY)
        out = np.repeat(g[..., None], 3, -1)
    return np.ascontiguousarray(out)


@dataclasses.dataclass
class TrainingSet:
    """A prepared TFDS training set: its data source and class ranges."""
    name: str
    data_dir: str
    split: str
    num_examples: int
    num_classes: int
    class_offsets: np.ndarray     # (num_classes + 1,)

    def labels(self) -> np.ndarray:
        """(num_examples,) int32: each example's class (examples are sorted by class)."""
        return np.repeat(np.arange(self.num_classes, dtype=np.int32), np.diff(self.class_offsets))

    def source(self):
        import tensorflow_datasets as tfds

        return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                download=False)


def open_training_set(name: str, data_dir, split: str = "train") -> TrainingSet:
    """Opens a prepared training set (scvnet_jax.data.builders) and checks its class ranges."""
    import tensorflow_datasets as tfds

    from scvnet_jax.data import builders  # noqa: F401  (registers the builders)

    try:
        builder = tfds.builder(name, data_dir=str(data_dir))
    except Exception as e:
        raise InputError(f"no TFDS dataset {name!r} ({type(e).__name__}: {e})") from None
    if not builder.is_prepared():
        raise InputError(f"{name} is not prepared in {data_dir}; build it first: python -m "
                         f"scvnet_jax.data.build {name} --data_dir {data_dir}"
                         + (" --manual_dir GLDV2" if "gldv2" in name else ""))
    meta = builder.info.metadata or {}
    if "class_offsets" not in meta:
        raise InputError(f"{builder.data_dir}: metadata has no 'class_offsets' (not written "
                         "by scvnet_jax.data.builders)")
    offsets = np.asarray(meta["class_offsets"], np.int64)
    n = builder.info.splits[split].num_examples
    if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) <= 0):
        raise InputError(f"{builder.data_dir}: class_offsets do not partition the {n} "
                         f"examples of split {split!r} into non-empty classes")
    return TrainingSet(name, str(data_dir), split, n, len(offsets) - 1, offsets)


class _Records:
    """Lazily opened data source + decoding; pickles without the open files (grain workers)."""

    def __init__(self, ts: TrainingSet):
        self.ts = ts
        self._source = None

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def _record(self, i: int) -> tuple[np.ndarray, int]:
        if self._source is None:
            self._source = self.ts.source()
        r = self._source[int(i)]
        label = int(r["label"])
        return decode(r["image"], f"{self.ts.name}[{i}] ({r['image_id'].decode()})"), label

    def _class_range(self, index: int, label: int) -> tuple[int, int]:
        lo, hi = int(self.ts.class_offsets[label]), int(self.ts.class_offsets[label + 1])
        if not lo <= index < hi:
            raise InputError(f"{self.ts.name}[{index}] has label {label}, outside its class "
                             f"range [{lo}, {hi}): the dataset is not sorted by label")
        return lo, hi

    @staticmethod
    def _other_in(lo: int, hi: int, index: int, rng: np.random.Generator) -> int:
        """A uniformly drawn index of [lo, hi) other than `index` (hi - lo >= 2)."""
        j = int(lo + rng.integers(0, hi - lo - 1))
        return j + (j >= index)


class PairTransform(_Records, grain.transforms.RandomMap):
    """Stream index -> {'image', 'positive', 'label'} for stage 1."""

    def __init__(self, ts: TrainingSet, aug: Augment, positive: str = "same_class"):
        if positive not in ("same_class", "same_image"):
            raise ValueError(f"positive must be 'same_class' or 'same_image', got {positive!r}")
        super().__init__(ts)
        self.aug, self.positive = aug, positive

    def random_map(self, index: Any, rng: np.random.Generator) -> dict:
        im, label = self._record(index)
        lo, hi = self._class_range(index, label)
        if self.positive == "same_class" and hi - lo > 1:
            pos, _ = self._record(self._other_in(lo, hi, index, rng))
        else:
            pos = im
        return {"image": augment(im, self.aug, rng), "positive": augment(pos, self.aug, rng),
                "label": np.int32(label)}


def linear_ramp(start: float, end: float, steps: int, step) -> float:
    """start -> end linearly over `steps` steps, then end (the stage-2 curricula)."""
    frac = min(max(float(step) / steps, 0.0), 1.0) if steps > 0 else 1.0
    return float(start + (end - start) * frac)


@dataclasses.dataclass(frozen=True)
class PairSampling:
    """How stage 2 draws the candidate of each query image."""
    positive_fraction: float = 0.5          # P(candidate from the same landmark)
    hard_ratio: tuple[float, float] = (0.0, 0.5)   # P(negative is hard): start -> end
    curriculum_steps: int = 1000            # length of the ramp, in steps
    local_batch: int = 1                    # pairs per step of this process


class RerankPairTransform(_Records, grain.transforms.RandomMap):
    """(stream position, index) -> {'query', 'candidate', 'label', 'hard'} for stage 2.

    label 1: the candidate is another image of the query's landmark (a second augmentation of
    the query for a single-image class); label 0: an image of another landmark, drawn from the
    query's row of the hard-negative table (its top-ranked images of other landmarks by the
    stage-1 descriptor) with the curriculum's probability at this step, else uniformly.
    The table is read lazily from `table_path` (memory-mapped .npy, (N, K) int32, -1 = none).
    """

    def __init__(self, ts: TrainingSet, aug: Augment, sampling: PairSampling, table_path: str):
        super().__init__(ts)
        self.aug, self.sampling, self.table_path = aug, sampling, str(table_path)
        self._table = None

    def __getstate__(self):
        return {**super().__getstate__(), "_table": None}

    def _hard(self, index: int, rng: np.random.Generator) -> int | None:
        if self._table is None:
            self._table = np.load(self.table_path, mmap_mode="r")
        row = np.asarray(self._table[index])
        row = row[row >= 0]
        return int(row[rng.integers(0, len(row))]) if len(row) else None

    def _random_other_class(self, lo: int, hi: int, rng: np.random.Generator) -> int:
        n = self.ts.num_examples
        j = int(rng.integers(0, n - (hi - lo)))
        return j + (hi - lo) * (j >= lo)     # uniform over the images outside [lo, hi)

    def random_map(self, element: Any, rng: np.random.Generator) -> dict:
        position, index = (int(v) for v in element)
        s = self.sampling
        step = position // s.local_batch
        im, label = self._record(index)
        lo, hi = self._class_range(index, label)
        hard = False
        if rng.random() < s.positive_fraction:
            target = 1
            other = im if hi - lo == 1 else self._record(self._other_in(lo, hi, index, rng))[0]
        else:
            target = 0
            j = None
            if rng.random() < linear_ramp(*s.hard_ratio, s.curriculum_steps, step):
                j = self._hard(index, rng)
            hard = j is not None
            if j is None:
                j = self._random_other_class(lo, hi, rng)
            other = self._record(j)[0]
        return {"query": augment(im, self.aug, rng), "candidate": augment(other, self.aug, rng),
                "label": np.int32(target), "hard": np.bool_(hard)}


def dataset(ts: TrainingSet, aug: Augment, *, global_batch: int, seed: int,
            positive: str = "same_class", process_index: int = 0, process_count: int = 1,
            num_epochs: int | None = None) -> grain.MapDataset:
    """The batched, shuffled, repeated stream of pairs for this process."""
    if global_batch % process_count:
        raise ValueError(f"batch_size {global_batch} is not divisible by the {process_count} "
                         "processes")
    ds = (grain.MapDataset.range(ts.num_examples)
          .shuffle(seed=seed)            # a new permutation every epoch
          .repeat(num_epochs))
    ds = ds[process_index::process_count]
    ds = ds.random_map(PairTransform(ts, aug, positive), seed=seed)
    return ds.batch(global_batch // process_count, drop_remainder=True)


def _with_position(position: int, index: int) -> tuple[int, int]:
    return position, index        # module level: grain transforms must pickle


def rerank_dataset(ts: TrainingSet, aug: Augment, sampling: PairSampling, table_path, *,
                   global_batch: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> grain.MapDataset:
    """Stage 2: the batched, shuffled, repeated stream of (query, candidate) pairs of this
    process. The element's position in the stream gives the step (for the curriculum), so a
    restored iterator continues the same stream, whichever table version it reads."""
    if global_batch % process_count:
        raise ValueError(f"batch_size {global_batch} is not divisible by the {process_count} "
                         "processes")
    local = global_batch // process_count
    sampling = dataclasses.replace(sampling, local_batch=local)
    ds = grain.MapDataset.range(ts.num_examples).shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count].map_with_index(_with_position)
    ds = ds.random_map(RerankPairTransform(ts, aug, sampling, table_path), seed=seed)
    return ds.batch(local, drop_remainder=True)


class BankTransform(_Records, grain.transforms.RandomMap):
    """Index -> (image, index) for the stage-2 descriptor bank: the whole image resized to
    size x size (version 0), or a random augmentation of it (later refreshes)."""

    def __init__(self, ts: TrainingSet, aug: Augment, augmented: bool):
        super().__init__(ts)
        self.aug, self.augmented = aug, augmented

    def random_map(self, index: Any, rng: np.random.Generator) -> dict:
        import cv2

        i = int(index)
        im, _ = self._record(i)
        if self.augmented:
            out = augment(im, self.aug, rng)
        else:
            interp = cv2.INTER_AREA if max(im.shape[:2]) > self.aug.size else cv2.INTER_LINEAR
            out = cv2.resize(im, (self.aug.size, self.aug.size), interpolation=interp)
        return {"image": np.ascontiguousarray(out), "index": np.int32(i)}


def bank_dataset(ts: TrainingSet, aug: Augment, *, version: int, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Every training image once, in order, in global batches of `global_batch` (the last
    one padded with index 0): this process's slice of each batch."""
    local = global_batch // process_count
    n = ts.num_examples
    total = -(-n // global_batch) * global_batch
    order = np.concatenate([np.arange(n), np.zeros(total - n, np.int64)])
    mine = order.reshape(-1, process_count, local)[:, process_index].reshape(-1)
    ds = grain.MapDataset.source(mine).random_map(
        BankTransform(ts, aug, augmented=version > 0), seed=seed + 7919 * version)
    return ds.batch(local, drop_remainder=True)


def iterator(ds: grain.MapDataset, *, threads: int = 8, prefetch: int = 16, workers: int = 0):
    """A checkpointable iterator: `get_state()` / `set_state()` (JSON-able dicts).
    threads: decode/augment threads in this process; workers > 0 adds grain worker processes."""
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=prefetch))
    if workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it)
