"""Parameter-free building blocks shared by the CVNet and SuperGlobal models.

Everything here works on channels-last (NHWC) arrays and follows PyTorch's semantics
exactly where the official code relies on them (bilinear resizing, GeM, L2 normalisation).
All sizes are static Python integers, so these functions trace once per input shape.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _linear_taps(n_in: int, n_out: int, align_corners: bool):
    """Source indices and weights of 1-D bilinear interpolation, as PyTorch computes them.

    Mirrors ATen's `area_pixel_compute_source_index` for `mode='bilinear'` called with an
    explicit output size (no scale factor, no antialiasing): with align_corners the source
    coordinate is i * (n_in - 1) / (n_out - 1) (0 when n_out == 1); without it,
    (i + 0.5) * n_in / n_out - 0.5 clamped at 0. Computed in float64 on the host.
    """
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        src = i * scale
    else:
        src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    return i0, i1, (1.0 - lam), lam


# Resizes of small axes (feature maps, correlations) are matrix products with the
# interpolation matrix: one GEMM instead of two gathers, a GEMM in the backward pass instead
# of a scatter-add, and far quicker to compile. The matrix holds the two taps of each output
# sample (the others are exact zeros), so the result is the two-tap sum up to float rounding.
# Long axes (images) keep the two-tap gather, whose cost does not grow with the axis.
MATMUL_MAX = 256


def interpolation_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    """(n_out, n_in) float32 matrix of 1-D bilinear interpolation (`_linear_taps`)."""
    i0, i1, w0, w1 = _linear_taps(n_in, n_out, align_corners)
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), w0)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m.astype(np.float32)


def _contract(x: jax.Array, m: jax.Array, axis: int, batched: bool) -> jax.Array:
    """out[..., o, ...] = sum_i m[(b,) o, i] x[..., i, ...] along `axis` (batch axis 0)."""
    letters = "abcdefghijklmnpqrstuvwxyz"[:x.ndim]
    src = letters[axis]
    dst = letters.replace(src, "o")
    spec_m = ("a" if batched else "") + "o" + src
    return jnp.einsum(f"{letters},{spec_m}->{dst}", x, m.astype(x.dtype),
                      precision=jax.lax.Precision.HIGHEST)


def resize_axis(x: jax.Array, axis: int, size: int, align_corners: bool) -> jax.Array:
    """Bilinear (linear along one axis) resize of `x` along `axis` to `size` samples."""
    n_in = x.shape[axis]
    if n_in == size:  # both conventions are the identity then
        return x
    if n_in <= MATMUL_MAX:
        return _contract(x, jnp.asarray(interpolation_matrix(n_in, size, align_corners)),
                         axis, batched=False)
    i0, i1, w0, w1 = _linear_taps(n_in, size, align_corners)
    shape = [1] * x.ndim
    shape[axis] = size
    w0 = jnp.asarray(w0.reshape(shape), x.dtype)
    w1 = jnp.asarray(w1.reshape(shape), x.dtype)
    return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1


def resize_bilinear(x: jax.Array, size: Sequence[int], align_corners: bool,
                    axes: Sequence[int] = (1, 2)) -> jax.Array:
    """Separable bilinear resize of the given axes (default: H, W of NHWC).

    Equals `torch.nn.functional.interpolate(mode='bilinear', size=size,
    align_corners=align_corners)` (no antialiasing) up to float rounding; with four axes
    it is the official `Geometry.interpolate4d` of a 4-D correlation.
    """
    for axis, n in zip(axes, size):
        x = resize_axis(x, axis, int(n), align_corners)
    return x


def resize_bilinear_host(x: np.ndarray, size: Sequence[int],
                         align_corners: bool = False) -> np.ndarray:
    """`resize_bilinear` of one (H, W, ...) host array to `size` (h, w), in NumPy: the same
    taps and float32 arithmetic (x[i0] * w0 + x[i1] * w1, H then W) on the host, so each
    scale of an image can be its own item of a padded batch."""
    out = np.asarray(x, np.float32)
    for axis, n in enumerate(size):
        n_in = out.shape[axis]
        if n_in == int(n):
            continue
        i0, i1, w0, w1 = _linear_taps(n_in, int(n), align_corners)
        shape = [1] * out.ndim
        shape[axis] = int(n)
        out = (np.take(out, i0, axis=axis) * w0.astype(np.float32).reshape(shape)
               + np.take(out, i1, axis=axis) * w1.astype(np.float32).reshape(shape))
    return out


def norm(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """||x||_2 along `axis` with PyTorch's gradient at 0 (zero, where sqrt's is infinite and
    gives NaN): all-zero vectors occur in training (Hide-and-Seek, padding). The value is
    exactly jnp.sqrt(sum(x^2))."""
    s = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
    nz = s > 0
    return jnp.where(nz, jnp.sqrt(jnp.where(nz, s, 1.0)), 0.0)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """`torch.nn.functional.normalize`: x / max(||x||_2, eps)."""
    return x / jnp.maximum(norm(x, axis, keepdims=True), eps)


def gem(x: jax.Array, p, eps: float, valid=None) -> jax.Array:
    """Generalised-mean pooling over H, W of NHWC `x`: mean(clamp(x, eps)^p)^(1/p) -> (B, C).
    With `valid` ((B, 2) sizes of a padded batch) the mean covers each valid region."""
    x = jnp.power(jnp.maximum(x, eps), p)
    return jnp.power(mean_valid(x, valid), 1.0 / p)


def reflect_pad_hw(x: jax.Array, pad: int) -> jax.Array:
    """Reflection padding of H and W of NHWC `x`.

    Where a side is longer than `pad` this is exactly `torch.nn.ReflectionPad2d(pad)`.
    PyTorch refuses smaller maps (the official SuperGlobal then crashes on images whose
    short side is below ~100 px at scale 0.7071); here the reflection simply repeats
    (NumPy's 'reflect' mode: a side of 2 gives ...b a b a b..., a side of 1 is replicated),
    so tiny images still get a finite descriptor.
    """
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def regional_gem(x: jax.Array, p: float = 2.5, size: int = 5, valid=None) -> jax.Array:
    """SuperGlobal's Regional-GeM: 0.5 * LpPool_{size x size, stride 1}(reflect-pad(x)) / size^(2/p) + 0.5 * x.

    `x` is a non-negative NHWC stage-4 map; the result has the same shape. With `valid`,
    the reflection is about each item's valid region of a padded batch.
    """
    nominator = (size ** 2) ** (1.0 / p)
    pad = (size - 1) // 2
    y = reflect_pad_hw(x / nominator, pad) if valid is None else reflect_pad_valid(
        x / nominator, pad, valid)
    pooled = jax.lax.reduce_window(jnp.power(y, p), jnp.array(0, y.dtype), jax.lax.add,
                                   (1, size, size, 1), (1, 1, 1, 1), "VALID")
    return 0.5 * jnp.power(pooled, 1.0 / p) + 0.5 * x


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """Size of an image resized by `scale` in SuperGlobal: (int(h * s), int(w * s)), at least 1."""
    return max(1, int(h * scale)), max(1, int(w * scale))


def corr_scale_size(h: int, w: int, area_scale: float) -> tuple[int, int]:
    """Feature-map size at an area scale in CVNet's correlation: Python round(h * sqrt(s))."""
    r = math.sqrt(area_scale)
    return max(1, round(h * r)), max(1, round(w * r))


# -- Ragged batches ------------------------------------------------------------------------
# Images of different sizes are batched by padding them (bottom/right) to a common bucket
# size and carrying each one's valid (h, w) as a (B, 2) int32 array. Every spatial op then
# behaves as on the unpadded image: the padded area is zeroed before each spatial conv (so
# it acts exactly like the conv's own zero padding), pooling and normalisation statistics
# use the valid area only, and resizes follow per-image plans computed on the host.


def valid_after(valid, stride: int = 2):
    """Valid size after a conv/pool with odd kernel k, padding k//2 and `stride`:
    (v + 2*(k//2) - k)//stride + 1 = (v - 1)//stride + 1. Works on ints and arrays."""
    return (valid - 1) // stride + 1


def valid_mask(valid, shape: Sequence[int]) -> jax.Array:
    """(B, *shape, 1) bool: True inside each item's valid region. `valid` is (B, len(shape))."""
    mask = None
    for axis, n in enumerate(shape):
        iota_shape = [1] * len(shape)
        iota_shape[axis] = n
        iota = jnp.arange(n).reshape(iota_shape)
        m = iota[None] < valid[:, axis].reshape((-1,) + (1,) * len(shape))
        mask = m if mask is None else mask & m
    return mask[..., None]


def mask_valid(x: jax.Array, valid, n_spatial: int = 2) -> jax.Array:
    """Zeroes everything outside the valid region (no-op when `valid` is None)."""
    if valid is None:
        return x
    return jnp.where(valid_mask(valid, x.shape[1:1 + n_spatial]), x, jnp.zeros((), x.dtype))


def mean_valid(x: jax.Array, valid, n_spatial: int = 2) -> jax.Array:
    """Mean over the spatial axes 1..n_spatial, over the valid region only -> (B, C)."""
    axes = tuple(range(1, 1 + n_spatial))
    if valid is None:
        return jnp.mean(x, axis=axes)
    total = jnp.sum(mask_valid(x, valid, n_spatial), axis=axes)
    count = jnp.prod(valid, axis=1).astype(x.dtype)[:, None]
    return total / count


class AxisPlan(NamedTuple):
    """Per-item bilinear taps along one axis: out[b, i] = x[b, i0]*w0 + x[b, i1]*w1, with
    zero weights past each item's output size. Arrays are (B, n_out_bucket)."""
    i0: Any
    i1: Any
    w0: Any
    w1: Any


def axis_plan(n_in, n_out, n_out_bucket: int, align_corners: bool) -> AxisPlan:
    """Host-side (NumPy, float64) plan resizing each item from n_in[b] to n_out[b] samples,
    the same taps `resize_axis` uses for a single size."""
    n_in, n_out = np.asarray(n_in).reshape(-1), np.asarray(n_out).reshape(-1)
    shape = (n_in.size, n_out_bucket)
    i0, i1 = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    w0, w1 = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for b, (ni, no) in enumerate(zip(n_in, n_out)):
        a0, a1, b0, b1 = _linear_taps(int(ni), int(no), align_corners)
        i0[b, :no], i1[b, :no], w0[b, :no], w1[b, :no] = a0, a1, b0, b1
    return AxisPlan(i0, i1, w0, w1)


def scale_plan(valid, bucket_hw, size_fn, align_corners: bool):
    """Host-side plan resizing each item of a padded batch from its valid (h, w) to
    size_fn(h, w), inside the bucket size_fn(H, W) -> (AxisPlan h, AxisPlan w, out (B, 2))."""
    valid = np.asarray(valid, np.int64)
    out = np.array([size_fn(int(h), int(w)) for h, w in valid], np.int64).reshape(-1, 2)
    bh, bw = size_fn(int(bucket_hw[0]), int(bucket_hw[1]))
    return (axis_plan(valid[:, 0], out[:, 0], bh, align_corners),
            axis_plan(valid[:, 1], out[:, 1], bw, align_corners), out.astype(np.int32))


def resize_by_plan(x: jax.Array, axis: int, plan: AxisPlan) -> jax.Array:
    """Applies an `AxisPlan` along `axis` of a batched array (a per-item interpolation
    matrix built from the plan on the device for short axes, two gathers for long ones)."""
    n_in = x.shape[axis]
    if n_in <= MATMUL_MAX:
        iota = jnp.arange(n_in)
        one_hot = lambda idx: (jnp.asarray(idx)[..., None] == iota).astype(x.dtype)
        m = (one_hot(plan.i0) * jnp.asarray(plan.w0, x.dtype)[..., None]
             + one_hot(plan.i1) * jnp.asarray(plan.w1, x.dtype)[..., None])
        return _contract(x, m, axis, batched=True)
    shape = [1] * x.ndim
    shape[0], shape[axis] = plan.i0.shape
    take = lambda idx: jnp.take_along_axis(x, jnp.reshape(idx, shape), axis=axis)
    w0 = jnp.reshape(plan.w0, shape).astype(x.dtype)
    w1 = jnp.reshape(plan.w1, shape).astype(x.dtype)
    return take(plan.i0) * w0 + take(plan.i1) * w1


def reflect_index(i, n):
    """NumPy 'reflect' index of position i in a length-n axis (repeats for small n)."""
    period = jnp.maximum(2 * (n - 1), 1)
    m = jnp.mod(i, period)
    return jnp.where(n <= 1, 0, jnp.where(m < n, m, period - m))


def reflect_pad_valid(x: jax.Array, pad: int, valid) -> jax.Array:
    """`reflect_pad_hw` about each item's valid region of a padded batch."""
    for axis in (1, 2):
        n_out = x.shape[axis] + 2 * pad
        pos = jnp.arange(n_out)[None, :] - pad
        idx = reflect_index(pos, valid[:, axis - 1][:, None])       # (B, n_out)
        shape = [1] * x.ndim
        shape[0], shape[axis] = idx.shape
        x = jnp.take_along_axis(x, idx.reshape(shape), axis=axis)
    return x
