"""AMES's local-feature detector head: `SpatialAttention2d` of the official AMES extraction.

The released AMES models for CVNet describe an image by the locations of its stage-3 map
that this head scores highest. Submodule names mirror the official state dict (`conv1`,
`bn`, `conv2`), so a checkpoint key maps to a Flax path one to one (see
`scvnet_jax.convert.mapping`):

  y      = bn(conv1(x))                    1x1 conv with bias, BatchNorm with running stats
  desc   = y / max(||y||_2, 1e-15)         the *normalised BN output*, not the input feature
  weight = softplus(conv2(relu(y)))        1x1 conv C -> 1 with bias; softplus with
                                           PyTorch's threshold 20 (identity above it)

Inference only (the official extraction runs it in eval mode): BatchNorm always uses its
running statistics, eps 1e-5. Channels-last: x is (..., C).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPS = 1e-5
NORM_EPS = 1e-15
SOFTPLUS_THRESHOLD = 20.0

Precision = Any


def softplus(x: jax.Array, threshold: float = SOFTPLUS_THRESHOLD) -> jax.Array:
    """PyTorch's `Softplus(beta=1, threshold)`: x where x > threshold, else log(1 + e^x)."""
    return jnp.where(x > threshold, x, jnp.log1p(jnp.exp(jnp.minimum(x, threshold))))


class Conv1x1(nn.Module):
    """A 1x1 convolution with bias over the last axis; its `kernel` is (1, 1, in, out) like
    nn.Conv's (the layout the converter's table writes)."""
    features: int
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (1, 1, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return jnp.einsum("...i,io->...o", x, kernel[0, 0], precision=self.precision) + bias


class SpatialAttention2d(nn.Module):
    """The detector: (..., C) local features -> (descriptors (..., C), weights (...)).

    channels: C (1024 for CVNet's stage 3).
    precision: of the two 1x1 convolutions ("highest": float32-exact on every backend).
    """
    channels: int = 1024
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32)
        y = Conv1x1(self.channels, self.precision, name="conv1")(x)
        y = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(y)
        norm = jnp.sqrt(jnp.sum(jnp.square(y), axis=-1, keepdims=True))
        desc = y / jnp.maximum(norm, NORM_EPS)
        logit = Conv1x1(1, self.precision, name="conv2")(jax.nn.relu(y))
        return desc, softplus(logit[..., 0])
