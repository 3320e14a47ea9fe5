"""Image files -> descriptors: CVNet-Global, SuperGlobal and local features.

Images are read in a thread pool (OpenCV releases the GIL), preprocessed exactly as the
official test code does, grouped into padded size buckets (one compilation per bucket) and
run on all of this process's devices (`RetrievalModel` splits each batch over its mesh;
a batch holds `batch_size` images per device). With several processes (`jax.distributed`)
chunk i of the image list is handled by process i % process_count and the descriptors are
gathered, so every process ends with all of them. Descriptors are cached chunk by chunk
(`engine.cache`), each chunk with the content digests of its images (a changed file is
recomputed); progress bars show images/s and ETA.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import cv2
import numpy as np
from tqdm.auto import tqdm

from scvnet_jax import mesh
from scvnet_jax.api import RetrievalModel
from scvnet_jax.data import batching
from scvnet_jax.engine.cache import ChunkCache, content_digests
from scvnet_jax.errors import ConfigError, InputError
from scvnet_jax.images import ImageRef, normalize, read_image
from scvnet_jax.models import ops
from scvnet_jax.models.cvnet import superglobal_factors

CVNET_SCALES = (0.7071, 1.0, 1.4142)


def cvnet_scales(im: np.ndarray, scales: Sequence[float] = CVNET_SCALES) -> list[np.ndarray]:
    """The official CVNet multi-scale inputs: OpenCV INTER_AREA below 1, INTER_LINEAR above."""
    out = []
    for s in scales:
        if s == 1.0:
            out.append(im)
        else:
            interp = cv2.INTER_AREA if s < 1.0 else cv2.INTER_LINEAR
            out.append(cv2.resize(im, dsize=(0, 0), fx=s, fy=s, interpolation=interp))
    return out


def _unit(d: np.ndarray) -> np.ndarray:
    return d / max(np.linalg.norm(d), 1e-12)


@dataclasses.dataclass(frozen=True)
class CVNetGlobal:
    """CVNet-Global as the official test: each scale (OpenCV-resized) gives an L2-normalised
    descriptor; their mean is L2-normalised."""
    scales: tuple = CVNET_SCALES
    name = "cvnet_global"

    def inputs(self, im: np.ndarray) -> list[np.ndarray]:
        return [normalize(x) for x in cvnet_scales(im, self.scales)]

    def run(self, model: RetrievalModel, batch: batching.PaddedBatch):
        """The descriptors of a batch, as a (not yet computed) device array."""
        return model.global_descriptor(batch.images, batch.valid)

    def combine(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return _unit(np.mean([_unit(p) for p in parts], axis=0))


@dataclasses.dataclass(frozen=True)
class SuperGlobal:
    """SuperGlobal as the official test: each scale of the image (bilinear, no
    antialiasing, to (int(h*s), int(w*s)), resized on the host exactly as the model would)
    gives a descriptor; S-GeM takes the maximum of their L2-normalised values (else their
    mean), and the result is L2-normalised. Each scale is its own item, so a program (one
    backbone at one padded shape) serves scales of images of different sizes, and compiles
    in a third of the time of `superglobal_descriptor`'s three backbones."""
    scales: int | tuple = 3
    rgem: bool = True
    sgem: bool = True
    relup: bool = True
    gemp: bool = True
    name = "superglobal"

    def inputs(self, im: np.ndarray) -> list[np.ndarray]:
        x = normalize(im)
        h, w = x.shape[:2]
        return [ops.resize_bilinear_host(x, ops.scaled_size(h, w, s))
                for s in superglobal_factors(self.scales)]

    def run(self, model: RetrievalModel, batch: batching.PaddedBatch):
        return model.superglobal_single_scale(batch.images, rgem=self.rgem, gemp=self.gemp,
                                              relup=self.relup, valid=batch.valid)

    def combine(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        if self.sgem:
            return _unit(np.max([_unit(p) for p in parts], axis=0))
        return _unit(np.mean(parts, axis=0))


FAMILIES = {"cvnet": CVNetGlobal, "superglobal": SuperGlobal}


def spec_of(family: str, **options):
    """The descriptor spec of a family name ('cvnet' or 'superglobal')."""
    if family not in FAMILIES:
        raise ConfigError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    return FAMILIES[family](**options)


def read_all(pool: ThreadPoolExecutor, refs: Sequence[ImageRef],
             max_side: int | None = None) -> list[np.ndarray]:
    """The images of `refs`, each read at working size `max_side` (None: the module's,
    `images.set_max_side`)."""
    return list(pool.map(lambda ref: read_image(ref, max_side), refs))


def image_errors(refs: Sequence[ImageRef], workers: int = 4) -> list[str | None]:
    """Reads and decodes every image (and crops every query box): per image, the
    InputError's message, or None for a good one."""
    def error(ref):
        try:
            read_image(ref)
        except InputError as e:
            return str(e)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(error, refs))


def check_images(refs: Sequence[ImageRef], workers: int = 4) -> None:
    """An InputError naming the first bad image of `refs`, before any expensive work."""
    bad = next((e for e in image_errors(refs, workers) if e is not None), None)
    if bad is not None:
        raise InputError(bad)


def extract_training_set(model: RetrievalModel, ts, spec, *, batch_size: int = 0,
                         bucket: int = 64, chunk_size: int = 256, workers: int = 4,
                         desc: str = "describe") -> np.ndarray:
    """Descriptors (N, D) of every image of a training set (`data.sources.TrainingSet`,
    whole images as stored) with `spec`, as `extract` computes them for files. With several
    processes, chunk i goes to process i % process_count and all get every row."""
    from scvnet_jax.data.sources import Records

    records = Records(ts)
    n = ts.num_examples
    starts = list(range(0, n, chunk_size))
    mine = [c for c in range(len(starts)) if mesh.owner(c) == mesh.process_index()]
    total = sum(min(n, starts[c] + chunk_size) - starts[c] for c in mine)
    rows, chunks = [np.zeros((0,), np.int64)], [np.zeros((0, model.arch.reduction_dim),
                                                         np.float32)]
    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, mininterval=2.0,
              disable=mesh.process_index() != 0) as bar, ThreadPoolExecutor(workers) as pool:
        for c in mine:
            idx = range(starts[c], min(n, starts[c] + chunk_size))
            images = list(pool.map(lambda i: records.record(i)[0], idx))
            chunks.append(describe_images(model, images, spec, batch_size, bucket, bar)
                          .astype(np.float32))
            rows.append(np.asarray(idx, np.int64))
    out = np.zeros((n, model.arch.reduction_dim), np.float32)
    out[mesh.allgather_rows(np.concatenate(rows))] = mesh.allgather_rows(
        np.concatenate(chunks))
    return out


def overlapped(batches, dispatch, collect) -> None:
    """collect(dispatch(batch)) for every batch, where the next batch is dispatched before
    the previous one is collected: jax runs asynchronously (only reading a result back
    waits), so padding and tracing the next batch overlap the device's work on the last."""
    pending = None
    for batch in batches:
        current = dispatch(batch)
        if pending is not None:
            collect(pending)
        pending = current
    if pending is not None:
        collect(pending)


def describe_images(model, images, spec, batch_size: int, bucket: int, bar) -> np.ndarray:
    """Descriptors (N, D) of decoded BGR uint8 images, in padded batches over every local
    device; `bar` (a tqdm) advances by one per finished image."""
    items, parts_left = [], {}
    for i, im in enumerate(images):
        xs = spec.inputs(im)
        parts_left[i] = len(xs)
        items += [((i, j), x) for j, x in enumerate(xs)]
    parts: dict = {i: [None] * k for i, k in parts_left.items()}

    def collect(pending):
        ids, descs = pending
        descs, done = np.asarray(descs), 0
        for row, (i, j) in enumerate(ids):
            parts[i][j] = descs[row]
            parts_left[i] -= 1
            done += parts_left[i] == 0
        bar.update(done)

    overlapped(batching.padded_batches(items, batch_size, bucket, model.num_devices,
                                       program=spec.name,
                                       compile_cost=batching.image_compile_cost(
                                           model.arch.width)),
               lambda batch: (batch.ids, spec.run(model, batch)), collect)
    return np.stack([spec.combine(parts[i]) for i in range(len(images))])


def extract(model: RetrievalModel, refs: Sequence[ImageRef], spec, *, batch_size: int = 0,
            bucket: int = 64, cache: ChunkCache | None = None, chunk_size: int = 256,
            workers: int = 4, desc: str = "extract", progress: bool = True) -> np.ndarray:
    """Descriptors (N, D) float32 of `refs` with `spec` (CVNetGlobal or SuperGlobal).

    batch_size: images per device per batch (0: `batching.default_batch_size`). Every
    process must call this with the same arguments; each computes its share and all
    return the whole array. progress: a bar on process 0 (off for a search's queries)."""
    chunk_size = cache.chunk_size if cache is not None else chunk_size
    n = len(refs)
    starts = list(range(0, n, chunk_size))
    mine = [c for c in range(len(starts)) if mesh.owner(c) == mesh.process_index()]
    total = sum(min(n, starts[c] + chunk_size) - starts[c] for c in mine)
    rows, chunks = [], []
    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, mininterval=2.0,
              disable=not progress or mesh.process_index() != 0) as bar, \
            ThreadPoolExecutor(workers) as pool:
        for c in mine:
            start, stop = starts[c], min(n, starts[c] + chunk_size)
            chunk = sources = None
            if cache is not None:
                sources = content_digests(refs[start:stop], pool)
                chunk = cache.get(c, stop - start, sources)
            if chunk is not None:
                bar.update(stop - start)
            else:
                chunk = describe_images(model, read_all(pool, refs[start:stop]), spec,
                                        batch_size, bucket, bar)
                if cache is not None:
                    cache.put(c, chunk, sources)
            rows.append(np.arange(start, stop))
            chunks.append(chunk.astype(np.float32))
    dim = model.arch.reduction_dim
    rows = np.concatenate(rows) if rows else np.zeros((0,), np.int64)
    chunks = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    out = np.zeros((n, dim), np.float32)
    out[mesh.allgather_rows(rows)] = mesh.allgather_rows(chunks)
    return out


def local_features(model: RetrievalModel, images: Sequence[np.ndarray], batch_size: int,
                   bucket: int) -> list[np.ndarray]:
    """Local features (scale 1, as the official rerank) of each BGR uint8 image, cropped to
    its valid size (host arrays)."""
    out: list = [None] * len(images)
    items = [(i, normalize(im)) for i, im in enumerate(images)]
    for batch in batching.padded_batches(
            items, batch_size, bucket, model.num_devices, program="local_features",
            compile_cost=batching.image_compile_cost(model.arch.width)):
        feats = np.asarray(model.local_features(batch.images, batch.valid))
        for row, (i, (h, w)) in enumerate(zip(batch.ids, model.feature_valid(batch.valid))):
            out[i] = feats[row, :h, :w]
    return out
