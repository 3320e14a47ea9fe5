"""Parameter-free building blocks shared by the CVNet and SuperGlobal models.

Everything here works on channels-last (NHWC) arrays and follows PyTorch's semantics
exactly where the official code relies on them (bilinear resizing, GeM, L2 normalisation).
All sizes are static Python integers, so these functions trace once per input shape.
"""
from __future__ import annotations

import math
from typing import Sequence

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


def resize_axis(x: jax.Array, axis: int, size: int, align_corners: bool) -> jax.Array:
    """Bilinear (linear along one axis) resize of `x` along `axis` to `size` samples."""
    n_in = x.shape[axis]
    if n_in == size:  # both conventions are the identity then
        return x
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


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """`torch.nn.functional.normalize`: x / max(||x||_2, eps)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def gem(x: jax.Array, p, eps: float) -> jax.Array:
    """Generalised-mean pooling over H, W of NHWC `x`: mean(clamp(x, eps)^p)^(1/p) -> (B, C)."""
    x = jnp.power(jnp.maximum(x, eps), p)
    return jnp.power(jnp.mean(x, axis=(1, 2)), 1.0 / p)


def reflect_pad_hw(x: jax.Array, pad: int) -> jax.Array:
    """Reflection padding of H and W of NHWC `x`.

    Where a side is longer than `pad` this is exactly `torch.nn.ReflectionPad2d(pad)`.
    PyTorch refuses smaller maps (the official SuperGlobal then crashes on images whose
    short side is below ~100 px at scale 0.7071); here the reflection simply repeats
    (NumPy's 'reflect' mode: a side of 2 gives ...b a b a b..., a side of 1 is replicated),
    so tiny images still get a finite descriptor.
    """
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def regional_gem(x: jax.Array, p: float = 2.5, size: int = 5) -> jax.Array:
    """SuperGlobal's Regional-GeM: 0.5 * LpPool_{size x size, stride 1}(reflect-pad(x)) / size^(2/p) + 0.5 * x.

    `x` is a non-negative NHWC stage-4 map; the result has the same shape.
    """
    nominator = (size ** 2) ** (1.0 / p)
    y = reflect_pad_hw(x / nominator, (size - 1) // 2)
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
