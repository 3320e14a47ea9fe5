"""ResNet-50/101/152 in the pycls layout used by the official CVNet and SuperGlobal code.

Submodule names follow the official state dict (`stem.conv`, `stem.bn`, `s1`..`s4`,
`b1`.., `proj`, `bn`, `f.a`, `f.a_bn`, .., `head.pool.p`, `head.fc`), so a PyTorch key maps
to a Flax path by replacing dots with slashes (see `scvnet_jax.convert`).

Differences from torchvision's ResNet that matter for parity: the stride of a bottleneck
is on its 3x3 conv; every padding is explicit and symmetric (PyTorch's `padding=1`, not
Flax's 'SAME', which pads asymmetrically at stride 2); BatchNorm eps is 1e-5 and its
running-average momentum 0.9 in Flax terms (PyTorch's 0.1).

Activations are written as `max(x, floor)`: a floor of 0 is a ReLU; SuperGlobal's ReLU+
uses a floor of 0.014 (see `Activations`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from scvnet_jax.models import ops
from scvnet_jax.models.arch import STAGE_DEPTHS
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # Flax convention: PyTorch's momentum 0.1

Dtype = Any
Precision = Any


def depth_from_stage_blocks(blocks: tuple[int, ...]) -> int:
    """Inverse of STAGE_DEPTHS; raises ValueError for an unknown layout."""
    for depth, stages in STAGE_DEPTHS.items():
        if tuple(blocks) == stages:
            return depth
    raise ValueError(f"no ResNet depth has {tuple(blocks)} blocks per stage "
                     f"(known: {', '.join(f'R{d}={s}' for d, s in STAGE_DEPTHS.items())})")


@dataclasses.dataclass(frozen=True)
class Activations:
    """Lower clamps of the ResNet's activations (static; part of the jit cache key).

    block_out: clamp of every residual block's output in stages 1-3 (ReLU+ uses 0.014).
    s1_inner: clamp of the two inner activations of every stage-1 bottleneck. The official
      SuperGlobal code sets these to 0.014 whether ReLU+ is on or off (it passes the class
      `relup`, which is truthy, where the flag was meant), so its descriptors depend on it.
    Stage-4 outputs, stage 2-4 inner activations and the stem always use a plain ReLU.
    """
    block_out: float = 0.0
    s1_inner: float = 0.0


RELU = Activations()


def superglobal_activations(relup: bool, official_quirk: bool = True) -> Activations:
    """The clamps of the official SuperGlobal backbone with ReLU+ on or off."""
    floor = 0.014
    return Activations(block_out=floor if relup else 0.0,
                       s1_inner=floor if (official_quirk or relup) else 0.0)


def stage_valid(valid, stage: int):
    """Valid size of the output of stage `stage` (0 = stem, 1..4 = s1..s4) of an input
    whose valid size is `valid`; None stays None. Works on ints and arrays."""
    if valid is None:
        return None
    v = ops.valid_after(ops.valid_after(valid))  # stem conv and max-pool, both stride 2
    for s in range(2, stage + 1):
        v = ops.valid_after(v)
    return v


def _conv(features: int, kernel: int, stride: int, name: str, dtype, precision, use_bias=False):
    if kernel == 1:
        return PointwiseConv(features, stride, dtype=dtype, precision=precision, name=name)
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                   precision=precision, name=name)


class PointwiseConv(nn.Module):
    """A 1x1 convolution (no bias) written as a matrix product: the same parameter
    (`kernel`, (1, 1, in, out), as nn.Conv) and the same values, but its gradient with
    respect to the kernel is a plain matmul, which XLA:CPU runs 10-20x faster than the
    backward-filter convolution nn.Conv lowers to (2/3 of a bottleneck's convs are 1x1).
    Stride s keeps every s-th row and column, as a 1x1 conv with stride s does."""
    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (1, 1, x.shape[-1], self.features), jnp.float32)
        if self.stride > 1:
            x = x[:, ::self.stride, ::self.stride, :]
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return jnp.einsum("bhwi,io->bhwo", x, kernel[0, 0], precision=self.precision)


def _bn(train: bool, name: str, dtype):
    # Training mode: two-pass batch variance. Flax's default E[x^2] - E[x]^2 cancels badly
    # in float32 and made a sharded train step's update differ from one device's by ~1%
    # (tests/training/test_stage1.py); inference uses the running averages either way.
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                        use_fast_variance=False, dtype=dtype, name=name)


class BottleneckTransform(nn.Module):
    """`f`: 1x1 (a), BN, act, 3x3 with the stride (b), BN, act, 1x1 (c), BN."""
    w_b: int
    w_out: int
    stride: int
    dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x, inner_floor: float = 0.0, train: bool = False, valid=None):
        d, p = self.dtype, self.precision
        x = _conv(self.w_b, 1, 1, "a", d, p)(x)
        x = jnp.maximum(_bn(train, "a_bn", d)(x), inner_floor)
        x = _conv(self.w_b, 3, self.stride, "b", d, p)(ops.mask_valid(x, valid))
        x = jnp.maximum(_bn(train, "b_bn", d)(x), inner_floor)
        x = _conv(self.w_out, 1, 1, "c", d, p)(x)
        return _bn(train, "c_bn", d)(x)


class ResBlock(nn.Module):
    """`b{i}`: x + f(x), with a projection (`proj`, `bn`) when the shape changes.

    Returns the sum *before* the block's activation, which the stage applies; CVNet's local
    features are this pre-activation output of the last stage-3 block. `valid`: (B, 2)
    valid input sizes of a padded batch (see ops.py), or None.
    """
    w_in: int
    w_out: int
    stride: int
    w_b: int
    dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x, inner_floor: float = 0.0, train: bool = False, valid=None):
        d, p = self.dtype, self.precision
        fx = BottleneckTransform(self.w_b, self.w_out, self.stride, d, p, name="f")(
            x, inner_floor, train, valid)
        if self.w_in != self.w_out or self.stride != 1:
            x = _bn(train, "bn", d)(_conv(self.w_out, 1, self.stride, "proj", d, p)(x))
        return x + fx


class ResStage(nn.Module):
    """`s{i}`: `depth` residual blocks named b1, b2, ..."""
    w_in: int
    w_out: int
    stride: int
    depth: int
    w_b: int
    dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x, inner_floor: float = 0.0, out_floor: float = 0.0,
                 train: bool = False, last_preact: bool = False, valid=None):
        for i in range(self.depth):
            stride = self.stride if i == 0 else 1
            block = ResBlock(self.w_in if i == 0 else self.w_out, self.w_out, stride, self.w_b,
                             self.dtype, self.precision, name=f"b{i + 1}")
            x = block(x, inner_floor, train, valid)
            if valid is not None and stride != 1:
                valid = ops.valid_after(valid, stride)
            if last_preact and i == self.depth - 1:
                return x
            x = jnp.maximum(x, out_floor)
        return x


class ResStem(nn.Module):
    """`stem`: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool (padding 1)."""
    width: int = 64
    dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x, train: bool = False, valid=None):
        x = _conv(self.width, 7, 2, "conv", self.dtype, self.precision)(ops.mask_valid(x, valid))
        x = nn.relu(_bn(train, "bn", self.dtype)(x))
        if valid is not None:  # >= 0 after the ReLU, so zeros pad like max-pool's -inf
            x = ops.mask_valid(x, ops.valid_after(valid, 2))
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class GeM(nn.Module):
    """`pool`: generalised-mean pooling with a learned exponent `p` of shape (1,)."""
    init_p: float = 3.0
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x, valid=None):
        p = self.param("p", nn.initializers.constant(self.init_p), (1,), jnp.float32)
        return ops.gem(x.astype(jnp.float32), p, self.eps, valid)


class GlobalHead(nn.Module):
    """`head`: GeM (`pool`) then a linear whitening layer (`fc`)."""
    reduction_dim: int = 2048
    precision: Precision = None

    def setup(self):
        self.pool = GeM()
        self.fc = nn.Dense(self.reduction_dim, precision=self.precision)

    def __call__(self, x, valid=None):
        return self.fc(self.pool(x, valid))


class ResNet(nn.Module):
    """The `encoder_q` of CVNet: stem, s1..s4 and the GeM + FC global head.

    Attributes:
      depth: 50, 101 or 152.
      width: channels of the stem; stage widths are 4x, 8x, 16x, 32x this (64 = standard).
      reduction_dim: output size of `head.fc`.
      dtype: computation dtype of convolutions and BatchNorm (parameters stay float32);
        pooling and normalisation always run in float32.
    """
    depth: int = 50
    width: int = 64
    reduction_dim: int = 2048
    dtype: Dtype = jnp.float32
    precision: Precision = None

    def setup(self):
        w = self.width
        d1, d2, d3, d4 = STAGE_DEPTHS[self.depth]
        kw = dict(dtype=self.dtype, precision=self.precision)
        self.stem = ResStem(w, **kw)
        self.s1 = ResStage(w, 4 * w, 1, d1, w, **kw)
        self.s2 = ResStage(4 * w, 8 * w, 2, d2, 2 * w, **kw)
        self.s3 = ResStage(8 * w, 16 * w, 2, d3, 4 * w, **kw)
        self.s4 = ResStage(16 * w, 32 * w, 2, d4, 8 * w, **kw)
        self.head = GlobalHead(self.reduction_dim, precision=self.precision)

    @property
    def local_dim(self) -> int:
        return 16 * self.width

    def _stages(self, x, act: Activations, train: bool, valid, last: int, last_preact=False):
        x = self.stem(x.astype(self.dtype), train, valid)
        stages = (self.s1, self.s2, self.s3, self.s4)[:last]
        for i, stage in enumerate(stages, start=1):
            v = stage_valid(valid, i - 1)
            inner = act.s1_inner if i == 1 else 0.0
            out = act.block_out if i < 4 else 0.0
            x = stage(x, inner, out, train, last_preact and i == last, v)
        return x

    def trunk(self, x, act: Activations = RELU, train: bool = False, valid=None):
        """Stem and stages 1-4 -> the stage-4 map (B, h/32, w/32, 32*width), after its ReLU.
        With `valid` (a padded batch, see ops.py) the map is valid on `stage_valid(valid, 4)`."""
        return self._stages(x, act, train, valid, 4)

    def layer3(self, x, train: bool = False, valid=None):
        """CVNet's local features: the last stage-3 block's output before its ReLU (float32),
        zero outside `stage_valid(valid, 3)` for a padded batch."""
        x = self._stages(x, RELU, train, valid, 3, last_preact=True).astype(jnp.float32)
        return ops.mask_valid(x, stage_valid(valid, 3))

    def __call__(self, x, train: bool = False, valid=None):
        """CVNet-Global before normalisation: head.fc(GeM_p(s4)) -> (B, reduction_dim)."""
        return self.head(self.trunk(x, RELU, train, valid), stage_valid(valid, 4))
