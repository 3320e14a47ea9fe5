"""Training sets: TFDS ArrayRecord folders written by `scvnet_jax.data.builders`, read with
`tfds.data_source` (random access, no TensorFlow in the process) by grain.

Examples are sorted by class and `class_offsets` gives each class's index range, so a
transform can draw another image of the same class (a positive) or of another class. The
per-stage streams (pairs, the descriptor bank) live with their stage in
`scvnet_jax.training.stage1` / `stage2`; what they share is here.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import grain
import numpy as np

from scvnet_jax.errors import InputError
from scvnet_jax.images import decode_image


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
        if type(e).__name__ == "DatasetNotFoundError":   # its message lists every TFDS set
            raise InputError(
                f"no dataset {name!r} in {data_dir} (expected {Path(data_dir) / name}/<version>"
                "/); build one from a folder of photos with: python -m scvnet_jax.data.build "
                f"folder --manual_dir PHOTOS --name {name} --data_dir {data_dir}") from None
        raise InputError(f"no TFDS dataset {name!r} ({type(e).__name__}: {e})") from None
    if not builder.is_prepared():
        raise InputError(f"{name} is not prepared in {data_dir}; build it first: python -m "
                         f"scvnet_jax.data.build {name} --data_dir {data_dir}"
                         + (" --manual_dir GLDV2" if "gldv2" in name else ""))
    meta = builder.info.metadata or {}
    key = "class_offsets" if split == "train" else f"{split}_class_offsets"
    if key not in meta:
        raise InputError(f"{builder.data_dir}: metadata has no {key!r} (not written "
                         "by scvnet_jax.data.builders or .folder)")
    if split not in builder.info.splits:
        raise InputError(f"{builder.data_dir}: no split {split!r}; it has "
                         f"{', '.join(builder.info.splits)}")
    offsets = np.asarray(meta[key], np.int64)
    n = builder.info.splits[split].num_examples
    if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) <= 0):
        raise InputError(f"{builder.data_dir}: class_offsets do not partition the {n} "
                         f"examples of split {split!r} into non-empty classes")
    return TrainingSet(name, str(data_dir), split, n, len(offsets) - 1, offsets)


class Records:
    """Base of the grain transforms: a lazily opened data source + decoding, and class
    ranges; pickles without the open files (grain workers get a copy)."""

    def __init__(self, ts: TrainingSet):
        self.ts = ts
        self._source = None

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def record(self, i: int) -> tuple[np.ndarray, int]:
        if self._source is None:
            self._source = self.ts.source()
        r = self._source[int(i)]
        label = int(r["label"])
        return decode_image(r["image"], f"{self.ts.name}[{i}] ({r['image_id'].decode()})"), label

    def class_range(self, index: int, label: int) -> tuple[int, int]:
        lo, hi = int(self.ts.class_offsets[label]), int(self.ts.class_offsets[label + 1])
        if not lo <= index < hi:
            raise InputError(f"{self.ts.name}[{index}] has label {label}, outside its class "
                             f"range [{lo}, {hi}): the dataset is not sorted by label")
        return lo, hi

    @staticmethod
    def other_in(lo: int, hi: int, index: int, rng: np.random.Generator) -> int:
        """A uniformly drawn index of [lo, hi) other than `index` (hi - lo >= 2)."""
        j = int(lo + rng.integers(0, hi - lo - 1))
        return j + (j >= index)


def open_or_build(name: str, data_dir) -> TrainingSet:
    """`open_training_set`, building the demo set on first use (a few seconds)."""
    data_dir = str(Path(data_dir).expanduser())
    try:
        return open_training_set(name, data_dir)
    except InputError:
        if name not in ("demo", "demo_landmarks"):
            raise
    from scvnet_jax.data import builders
    builders.prepare("demo", data_dir)
    return open_training_set("demo_landmarks", data_dir)


class _ProcessRows(grain.MapDataset):
    """This process's rows of a stream cut into global batches: row j is global position
    (j // local) * global + process_index * local + j % local."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        self._local = global_batch // process_count
        self._global, self._offset = global_batch, process_index * self._local

    def __len__(self) -> int:
        return len(self._parents[0]) // self._global * self._local

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        s, o = divmod(int(j), self._local)
        return self._parents[0][s * self._global + self._offset + o]


def process_batches(ds: grain.MapDataset, global_batch: int, process_index: int = 0,
                    process_count: int = 1) -> grain.MapDataset:
    """This process's part of every global batch of the stream `ds`: batch s holds global
    positions [s * global_batch, (s + 1) * global_batch), process p the p-th of
    `process_count` equal contiguous parts. Apply random transforms to `ds` before, so an
    element's randomness depends on its global position only: the global batches are then
    the same whatever the number of processes."""
    if global_batch % process_count:
        raise InputError(f"batch_size {global_batch} is not divisible by the {process_count} "
                         "processes")
    local = global_batch // process_count
    return _ProcessRows(ds, global_batch, process_index, process_count).batch(
        local, drop_remainder=True)


def iterator(ds: grain.MapDataset, *, threads: int = 8, prefetch: int = 16, workers: int = 0):
    """A checkpointable iterator: `get_state()` / `set_state()` (JSON-able dicts).
    threads: decode/augment threads in this process; workers > 0 adds grain worker processes."""
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=prefetch))
    if workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it)
