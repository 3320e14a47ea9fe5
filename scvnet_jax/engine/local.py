"""AMES local descriptors of CVNet, as the official AMES extraction writes them.

AMES (github pavelsuma/ames, `extract/extract_cvnet.py`) describes an image by up to `topk`
locations of CVNet's stage-3 maps over three OpenCV scales. Per image:

  1. Inputs: for each nominal scale s of (0.7071, 1.0, 1.4142), the BGR uint8 image (a query
     already cropped `im[int(y1):int(y2), int(x1):int(x2)]`) resized by OpenCV with factor s
     (INTER_AREA below 1, INTER_LINEAR above, untouched at 1), normalised as CVNet's input
     (`extract.cvnet_scales`, `images.normalize`); one forward per scale.
  2. Features: the last stage-3 block before its ReLU, (h, w, 1024) (`local_features`).
  3. With the detector head (`models.detector.SpatialAttention2d`): descriptor = its
     normalised BN output, weight = its softplus score. Without: descriptor = the raw feature
     (not normalised), weight = its L2 norm.
  4. Selection: every location of every scale is a candidate (no NMS); the `topk` largest
     weights, sorted by weight, descending. Exact ties (for which `torch.topk` leaves the
     order unspecified) are broken here by the location's index in the concatenation of the
     maps, scale-major then row-major: the lower index first.
  5. Row = [y, x, scale index j, mask, weight, descriptor], float32, 5 + 1024 columns, with
     y = float32(16 r / s), x = float32(16 c / s) computed in float64 from the map's (row,
     column) (r, c) and the *nominal* factor s: the centre of the location's receptive field
     in pixels of the image before scaling (for a query, the cropped image). Rows past the
     image's number of locations (`length`, the official seq_len) are zero except mask = 1.

`local_descriptors` gives those rows for one image. `extract_local` does the same for many
image files at once: all scales of all images go through the engine's padded size buckets
(one compilation per bucket, batches split over every local device), the detector and a
per-map top-k run on the device (padded locations masked out), so only k candidates per
map come back to the host, where the maps of an image are merged. The result is a compact
`LocalFeatures` (descriptors in float16 by default), cached chunk by chunk on disk.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from scvnet_jax import mesh as mesh_lib
from scvnet_jax.api import RetrievalModel
from scvnet_jax.convert import mapping
from scvnet_jax.convert.torch_file import load_torch_file
from scvnet_jax.data import batching
from scvnet_jax.engine.cache import (BACKBONE, ChunkCache, content_digests, refs_fingerprint,
                                     weights_fingerprint)
from scvnet_jax.engine.extract import CVNET_SCALES, cvnet_scales, overlapped
from scvnet_jax.errors import ConfigError, CheckpointError, InputError
from scvnet_jax.images import ImageRef, normalize, read_image
from scvnet_jax.models import ops
from scvnet_jax.models.detector import SpatialAttention2d

SCALES = CVNET_SCALES
TOPK = 700
STRIDE = 16.0            # of the stage-3 map: positions are STRIDE * (r, c) / s
META_COLUMNS = 5         # y, x, scale index, mask, weight
FORMAT_VERSION = 1       # of cached LocalFeatures chunks


# -- the detector ---------------------------------------------------------------------------

class Detector:
    """The AMES detector head with its weights (`detector_from_state_dict`, `load_detector`).

    module: the Flax `SpatialAttention2d`; variables: {'params', 'batch_stats'} as NumPy.
    Calling it maps (..., C) features to (descriptors (..., C), weights (...)).
    """

    def __init__(self, module: SpatialAttention2d, variables, source: str | None = None):
        self.module = module
        self.variables = variables
        self.source = source
        self._placed: dict = {}
        self._fingerprint: str | None = None

    @property
    def channels(self) -> int:
        return self.module.channels

    @property
    def fingerprint(self) -> str:
        """sha256 of the weights (what cached descriptors are keyed by)."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.variables)
        return self._fingerprint

    def placed(self, mesh):
        """The variables replicated over `mesh` (placed once per mesh)."""
        if mesh not in self._placed:
            self._placed[mesh] = jax.device_put(self.variables, mesh_lib.replicated(mesh))
        return self._placed[mesh]

    def __call__(self, features):
        return _apply_detector(self.module, self.variables, features)

    def __repr__(self) -> str:
        return f"Detector(SpatialAttention2d({self.channels}), source={self.source!r})"


@partial(jax.jit, static_argnames=("module",))
def _apply_detector(module, variables, features):
    return module.apply(variables, features)


def _expected_keys(channels: int) -> dict[str, tuple]:
    c = channels
    return {"conv1.weight": (c, c, 1, 1), "conv1.bias": (c,), "bn.weight": (c,),
            "bn.bias": (c,), "bn.running_mean": (c,), "bn.running_var": (c,),
            "conv2.weight": (1, c, 1, 1), "conv2.bias": (1,)}


def detector_from_state_dict(state_dict: Mapping[str, Any], channels: int = 1024, *,
                             source: str = "detector state dict") -> Detector:
    """The detector from an official `SpatialAttention2d` state dict ({name: NumPy array},
    names conv1.*, bn.*, conv2.*), checked as PyTorch's `load_state_dict(strict=True)`:
    every key present, none unexpected, every shape right (`bn.num_batches_tracked` may be
    absent, as PyTorch allows for a plain dict), reported as one CheckpointError."""
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointError(f"{source}: expected a detector state dict ({{name: tensor}}), "
                              f"got {type(state_dict).__name__}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in state_dict.items()
           if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        raise CheckpointError(f"{source}: state-dict entries that are not tensors: "
                              + ", ".join(bad[:5]))
    mapping.check_state_dict(state_dict, _expected_keys(channels), source,
                             f"the AMES detector SpatialAttention2d({channels})")
    for k, v in state_dict.items():
        if not np.issubdtype(v.dtype, np.number) and k != "bn.num_batches_tracked":
            raise CheckpointError(f"{source}: {k} has dtype {v.dtype}, expected float")
    variables = mapping.state_dict_to_variables(state_dict)
    return Detector(SpatialAttention2d(channels), variables, source)


def load_detector(path, channels: int = 1024) -> Detector:
    """The released AMES detector checkpoint (`torch.save({'state': state_dict})`, as the
    official extraction loads it with `torch.load(path)['state']`, strict=True), read
    without torch and without running code from the file."""
    source = os.fspath(path)
    obj = load_torch_file(source)
    if isinstance(obj, Mapping) and "state" in obj:
        obj = obj["state"]
    return detector_from_state_dict(obj, channels, source=source)


# -- the result -----------------------------------------------------------------------------

@dataclasses.dataclass
class LocalFeatures:
    """The local descriptors of N images, at most K each (rows past `length` are padding).

    desc:   (N, K, D) descriptors, in the chosen dtype (float16 by default); zero on padding.
    weight: (N, K) float32 selection weights (detector score or L2 norm), non-increasing
            along each image's rows; zero on padding.
    yx:     (N, K, 2) float32 positions (y, x): float32(16 (r, c) / s) in pixels of the
            image before scaling (a query's cropped image); zero on padding.
    scale:  (N, K) int8 index into `scales` of each row's scale; zero on padding.
    length: (N,) int32 number of real rows of each image (the official seq_len).
    scales: the nominal scale factors.
    """
    desc: np.ndarray
    weight: np.ndarray
    yx: np.ndarray
    scale: np.ndarray
    length: np.ndarray
    scales: tuple = SCALES

    def __len__(self) -> int:
        return int(self.length.shape[0])

    @property
    def topk(self) -> int:
        return int(self.weight.shape[1])

    @property
    def dim(self) -> int:
        return int(self.desc.shape[2])

    @property
    def mask(self) -> np.ndarray:
        """(N, K) bool, True on padding rows (as AMES reads the mask column)."""
        return np.arange(self.topk)[None, :] >= self.length[:, None]

    def __getitem__(self, index) -> "LocalFeatures":
        """The images `index` (an int keeps a leading axis of 1; slices and index arrays)."""
        index = [index] if isinstance(index, (int, np.integer)) else index
        return LocalFeatures(self.desc[index], self.weight[index], self.yx[index],
                             self.scale[index], self.length[index], self.scales)

    def rows(self, i: int | None = None) -> np.ndarray:
        """The official rows, float32 (N, K, 5 + D), or (K, 5 + D) for image i:
        [y, x, scale index, mask (1 = padding), weight, descriptor]."""
        part = self if i is None else self[i]
        n, k = len(part), part.topk
        out = np.zeros((n, k, META_COLUMNS + part.dim), np.float32)
        out[..., 0:2] = part.yx
        out[..., 2] = part.scale
        out[..., 3] = part.mask
        out[..., 4] = part.weight
        out[..., META_COLUMNS:] = part.desc
        return out if i is None else out[0]

    @classmethod
    def from_rows(cls, rows: np.ndarray, scales: Sequence[float] = SCALES,
                  dtype=np.float32) -> "LocalFeatures":
        """From official rows (N, K, 5 + D) (e.g. AMES's hdf5 `features`)."""
        rows = np.asarray(rows, np.float32)
        if rows.ndim == 2:
            rows = rows[None]
        pad = rows[..., 3] != 0
        length = np.where(pad.any(1), pad.argmax(1), rows.shape[1]).astype(np.int32)
        return cls(rows[..., META_COLUMNS:].astype(dtype), rows[..., 4].copy(),
                   rows[..., 0:2].copy(), rows[..., 2].astype(np.int8), length,
                   tuple(float(s) for s in scales))

    @classmethod
    def zeros(cls, n: int, topk: int, dim: int, dtype=np.float16,
              scales: Sequence[float] = SCALES) -> "LocalFeatures":
        return cls(np.zeros((n, topk, dim), dtype), np.zeros((n, topk), np.float32),
                   np.zeros((n, topk, 2), np.float32), np.zeros((n, topk), np.int8),
                   np.zeros((n,), np.int32), tuple(float(s) for s in scales))

    @classmethod
    def concatenate(cls, parts: Sequence["LocalFeatures"]) -> "LocalFeatures":
        return cls(*(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("desc", "weight", "yx", "scale", "length")), parts[0].scales)

    # one structured record per image: how a chunk is cached (one .npz, no pickle)
    def _record_dtype(self) -> np.dtype:
        k, d = self.topk, self.dim
        return np.dtype([("desc", self.desc.dtype, (k, d)), ("weight", np.float32, (k,)),
                         ("yx", np.float32, (k, 2)), ("scale", np.int8, (k,)),
                         ("length", np.int32)])

    def to_records(self) -> np.ndarray:
        rec = np.zeros(len(self), self._record_dtype())
        for f in ("desc", "weight", "yx", "scale", "length"):
            rec[f] = getattr(self, f)
        return rec

    @classmethod
    def from_records(cls, rec: np.ndarray, scales: Sequence[float]) -> "LocalFeatures":
        return cls(*(np.array(rec[f]) for f in ("desc", "weight", "yx", "scale", "length")),
                   tuple(float(s) for s in scales))


# -- on the device: weights, descriptors and each map's top k -------------------------------

@partial(jax.jit, static_argnames=("module", "k", "dtype"))
def _top_of_maps(module, variables, features, valid, *, k: int, dtype):
    """Per map of a (B, h, w, C) batch whose valid sizes are `valid` (B, 2): the k largest
    weights of its valid locations (descending; ties: lower index first), their flat
    indices into (h, w) and descriptors (cast to `dtype`)."""
    b, h, w, c = features.shape
    if module is None:
        desc = features
        weight = jnp.sqrt(jnp.sum(jnp.square(features), axis=-1))
    else:
        desc, weight = module.apply(variables, features)
    weight = jnp.where(ops.valid_mask(valid, (h, w))[..., 0], weight, -jnp.inf)
    top_w, top_i = jax.lax.top_k(weight.reshape(b, h * w), k)
    top_d = jnp.take_along_axis(desc.reshape(b, h * w, c), top_i[..., None], axis=1)
    return top_w, top_i.astype(jnp.int32), top_d.astype(dtype)


def _check_detector(model: RetrievalModel, detector: Detector | None) -> None:
    if detector is not None and detector.channels != model.arch.local_dim:
        raise ConfigError(f"the detector takes {detector.channels} channels but the model's "
                          f"local features have {model.arch.local_dim}")


def _check_scales(scales) -> tuple[float, ...]:
    scales = tuple(float(s) for s in scales)
    if not scales or any(not np.isfinite(s) or s <= 0 for s in scales) or len(scales) > 127:
        raise ConfigError(f"scales must be 1 to 127 positive factors, got {scales}")
    return scales


class _Merger:
    """Collects each image's per-map candidates and, once all its maps are in, writes its
    top-k rows into `out` (a LocalFeatures)."""

    def __init__(self, out: LocalFeatures, n_scales: int):
        self.out, self.n_scales = out, n_scales
        self.parts: dict[int, dict] = {}

    def add(self, i: int, j: int, w, idx, d, valid_hw, map_w: int) -> bool:
        """Candidates of image i at scale j; True when image i is complete."""
        self.parts.setdefault(i, {})[j] = (w, idx, d, valid_hw, map_w)
        if len(self.parts[i]) < self.n_scales:
            return False
        self._finish(i, self.parts.pop(i))
        return True

    def _finish(self, i: int, parts: dict) -> None:
        out, scales = self.out, self.out.scales
        ws, gids, ds, js, rs, cs = [], [], [], [], [], []
        offset = 0
        for j in range(self.n_scales):
            w, idx, d, (hv, wv), map_w = parts[j]
            r, c = idx // map_w, idx % map_w
            keep = (r < hv) & (c < wv)
            ws.append(w[keep])
            gids.append(offset + r[keep].astype(np.int64) * wv + c[keep])
            ds.append(d[keep])
            js.append(np.full(int(keep.sum()), j, np.int8))
            rs.append(r[keep])
            cs.append(c[keep])
            offset += int(hv) * int(wv)
        w, gid = np.concatenate(ws), np.concatenate(gids)
        n = min(offset, out.topk)
        order = np.lexsort((gid, -w.astype(np.float64)))[:n]
        j = np.concatenate(js)[order]
        r = np.concatenate(rs)[order].astype(np.float64)
        c = np.concatenate(cs)[order].astype(np.float64)
        s = np.asarray(scales, np.float64)[j]
        out.desc[i, :n] = np.concatenate(ds)[order]
        out.weight[i, :n] = w[order]
        out.yx[i, :n, 0] = (STRIDE * r / s).astype(np.float32)
        out.yx[i, :n, 1] = (STRIDE * c / s).astype(np.float32)
        out.scale[i, :n] = j
        out.length[i] = n


def _describe(model: RetrievalModel, images: Sequence[np.ndarray], detector, topk: int,
              scales: tuple, batch_size: int, bucket: int | None, dtype, bar=None,
              pool: ThreadPoolExecutor | None = None) -> LocalFeatures:
    """LocalFeatures of decoded BGR uint8 images. bucket None: every map alone and unpadded
    (the per-image reference path); else padded size buckets of `batch_size` maps per
    device. One batch is prepared on the host while the previous runs on the device."""
    out = LocalFeatures.zeros(len(images), topk, model.arch.local_dim, dtype, scales)
    merger = _Merger(out, len(scales))
    scaled = (pool.map if pool is not None else map)(lambda im: cvnet_scales(im, scales),
                                                     images)
    items = [((i, j), x) for i, xs in enumerate(scaled) for j, x in enumerate(xs)]
    module = None if detector is None else detector.module
    variables = None if detector is None else detector.placed(model.mesh)

    if bucket is None:
        batches = (batching.PaddedBatch([key], x[None].astype(np.float32), None)
                   for key, x in items)
    else:
        # uint8 values are padded as float32 and normalised here, per batch: the same bits
        # as normalising each image; the padding's values do not matter (the stem masks it)
        batches = batching.padded_batches(
            items, batch_size, bucket, model.num_devices, program="local_features",
            compile_cost=batching.image_compile_cost(model.arch.width))

    def dispatch(batch):
        feats = model.local_features(normalize(batch.images), batch.valid)
        h, w = feats.shape[1:3]
        valid = (np.tile(np.int32([[h, w]]), (feats.shape[0], 1)) if batch.valid is None
                 else model.feature_valid(batch.valid))
        top = _top_of_maps(module, variables, feats, valid, k=min(topk, h * w),
                           dtype=np.dtype(dtype))
        return batch.ids, valid, w, top

    def collect(pending):
        ids, valid, map_w, top = pending
        w, idx, d = (np.asarray(a) for a in top)
        done = sum(merger.add(i, j, w[row], idx[row], d[row], valid[row], map_w)
                   for row, (i, j) in enumerate(ids))
        if bar is not None:
            bar.update(done)

    overlapped(batches, dispatch, collect)
    return out


def local_descriptors(model: RetrievalModel, image: np.ndarray,
                      detector: Detector | None = None, topk: int = TOPK,
                      scales: Sequence[float] = SCALES) -> np.ndarray:
    """The official AMES rows of one image -> (topk, 5 + D) float32 (see the module doc).

    model: a RetrievalModel (CVNet R101 for the released AMES weights).
    image: one BGR uint8 (H, W, 3) array; a query already cropped to its box.
    detector: the AMES detector (`load_detector`), or None: raw features weighted by their
      L2 norm.
    Each scale runs alone and unpadded, as the official extraction does.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise InputError(f"image must be one BGR uint8 (H, W, 3) array, got {image.dtype} "
                         f"{image.shape}")
    _check_detector(model, detector)
    feats = _describe(model, [image], detector, int(topk), _check_scales(scales), 1, None,
                      np.float32)
    return feats.rows(0)


def describe_local(model: RetrievalModel, images: Sequence[np.ndarray],
                   detector: Detector | None = None, topk: int = TOPK,
                   scales: Sequence[float] = SCALES, batch_size: int = 0, bucket: int = 64,
                   dtype=np.float16, bar=None) -> LocalFeatures:
    """LocalFeatures of decoded BGR uint8 images (e.g. a training set's records), in padded
    size buckets over every local device, as `extract_local` computes them for files; `bar`
    (a tqdm) advances by one per finished image."""
    _check_detector(model, detector)
    return _describe(model, list(images), detector, int(topk), _check_scales(scales),
                     int(batch_size), batching.parse_bucket(bucket), np.dtype(dtype), bar)


def descriptor_dim(model: RetrievalModel, detector: Detector | None = None) -> int:
    """The dimension of the local descriptors of `model` (+ `detector`)."""
    return int(detector.channels if detector is not None else model.arch.local_dim)


# -- many image files -----------------------------------------------------------------------

def cache_key(model: RetrievalModel, refs: Sequence[ImageRef], detector: Detector | None,
              topk: int, scales: Sequence[float], dtype=np.float16) -> dict:
    """What cached LocalFeatures depend on: the backbone's weights (`engine.cache.BACKBONE`),
    the model's dtype and precision, the detector's weights, topk, scales, the descriptor
    dtype and the image list (file contents are checked per chunk)."""
    return {"weights": weights_fingerprint(model.variables, BACKBONE), "weights_part": BACKBONE,
            "model_dtype": jnp.dtype(model.module.dtype).name,
            "precision": str(getattr(model.module, "precision", None)),
            "detector": None if detector is None else detector.fingerprint,
            "topk": int(topk), "scales": [float(s) for s in scales],
            "desc_dtype": np.dtype(dtype).name, "images": refs_fingerprint(refs),
            "local_format": FORMAT_VERSION}


def local_cache(cache_dir, model: RetrievalModel, refs: Sequence[ImageRef],
                detector: Detector | None, topk: int = TOPK,
                scales: Sequence[float] = SCALES, dtype=np.float16,
                chunk_size: int = 256, kind: str = "ames-local") -> ChunkCache:
    """A ChunkCache in `cache_dir` keyed by `cache_key`."""
    return ChunkCache(cache_dir, kind, cache_key(model, refs, detector, topk, scales, dtype),
                      chunk_size)


def extract_local(model: RetrievalModel, refs: Sequence[ImageRef | str],
                  detector: Detector | None = None, topk: int = TOPK,
                  scales: Sequence[float] = SCALES, batch_size: int = 0, *,
                  bucket: int = 64, dtype=np.float16,
                  cache: ChunkCache | str | os.PathLike | None = None,
                  chunk_size: int = 256, workers: int = 4,
                  desc: str = "local") -> LocalFeatures:
    """AMES local descriptors of image files (queries as ImageRefs with their box) ->
    LocalFeatures of len(refs) images, the same rows as `local_descriptors` per image.

    batch_size: maps per device per batch (every scale of every image is one map; maps of
      one size bucket, (h, w) rounded up to `bucket` pixels, share a batch and a compiled
      program).
    dtype: of the descriptors (float16 halves memory and cache; float32 for parity).
    cache: a directory (a cache keyed by `cache_key` is made in it), a ChunkCache whose key
      includes `cache_key(...)`, or None. Chunks of `chunk_size` images are stored as they
      finish, with their files' content digests.
    With several processes, chunk i is computed by process i % process_count and every
    process returns all images.
    """
    refs = [r if isinstance(r, ImageRef) else ImageRef(str(r)) for r in refs]
    scales, topk, dtype = _check_scales(scales), int(topk), np.dtype(dtype)
    if topk < 1:
        raise ConfigError(f"topk must be >= 1, got {topk}")
    if dtype not in (np.float16, np.float32):
        raise ConfigError(f"dtype must be float16 or float32, got {dtype}")
    _check_detector(model, detector)
    if isinstance(cache, (str, os.PathLike)):
        cache = local_cache(cache, model, refs, detector, topk, scales, dtype, chunk_size)
    elif cache is not None:
        need = cache_key(model, refs, detector, topk, scales, dtype)
        wrong = sorted(k for k, v in need.items() if cache.key.get(k) != v)
        if wrong:
            raise InputError("the cache's key does not hold these settings of this extraction "
                             f"({', '.join(wrong)}): build it with engine.local.local_cache, "
                             "or include engine.local.cache_key(...) in its key")
    chunk_size = cache.chunk_size if cache is not None else chunk_size
    n = len(refs)
    starts = list(range(0, n, chunk_size))
    mine = [c for c in range(len(starts)) if mesh_lib.owner(c) == mesh_lib.process_index()]
    total = sum(min(n, starts[c] + chunk_size) - starts[c] for c in mine)
    empty = LocalFeatures.zeros(0, topk, model.arch.local_dim, dtype, scales)
    record_dtype = empty._record_dtype()
    rows, chunks = [np.zeros((0,), np.int64)], [empty]
    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, mininterval=2.0,
              disable=mesh_lib.process_index() != 0) as bar, \
            ThreadPoolExecutor(workers) as pool:
        for c in mine:
            start, stop = starts[c], min(n, starts[c] + chunk_size)
            got = sources = None
            if cache is not None:
                sources = content_digests(refs[start:stop], pool)
                rec = cache.get(c, stop - start, sources)
                if rec is not None and rec.dtype == record_dtype:
                    got = LocalFeatures.from_records(rec, scales)
            if got is not None:
                bar.update(stop - start)
            else:
                images = list(pool.map(read_image, refs[start:stop]))
                got = _describe(model, images, detector, topk, scales, batch_size, bucket,
                                dtype, bar, pool)
                if cache is not None:
                    cache.put(c, got.to_records(), sources)
            rows.append(np.arange(start, stop))
            chunks.append(got)
    mine_feats = LocalFeatures.concatenate(chunks)
    order = mesh_lib.allgather_rows(np.concatenate(rows))
    gathered = [mesh_lib.allgather_rows(getattr(mine_feats, f))
                for f in ("desc", "weight", "yx", "scale", "length")]
    out = LocalFeatures.zeros(n, topk, model.arch.local_dim, dtype, scales)
    for f, values in zip(("desc", "weight", "yx", "scale", "length"), gathered):
        getattr(out, f)[order] = values
    return out


__all__ = ["SCALES", "TOPK", "Detector", "LocalFeatures", "describe_local", "descriptor_dim",
           "detector_from_state_dict",
           "load_detector", "local_descriptors", "extract_local", "cache_key", "local_cache"]
