"""CVNet (global descriptor + Correlation Verification reranker) and SuperGlobal descriptors.

One Flax module, `CVNet`, owns the three parameter groups of an official CVNet checkpoint:
`encoder_q` (the ResNet, see resnet.py), `conv2ds_{0,1,2}` (per-scale 3x3 channel
compression) and `cv_learner` (4-D convolutional verifier). Its methods are the models:

  global_descriptor      CVNet-Global: L2-normalised head.fc(GeM_p(s4)).
  local_features         last stage-3 block before its ReLU.
  correlation            cross-scale 4-D correlation of two local feature maps.
  verification_logits    CVLearner on that correlation -> (B, 2).
  verification_score     softmax(logits)[:, 1] for image pairs.
  superglobal_descriptor SuperGlobal's GeM+ / Regional-GeM / Scale-GeM / ReLU+ descriptor.

All methods take NHWC float arrays, normalised the official way (BGR, mean/std in
`scvnet_jax.data.preprocess`) and work with plain `init`/`apply(..., method=...)`.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scvnet_jax.models import ops
from scvnet_jax.models.resnet import RELU, ResNet, superglobal_activations

Dtype = Any
Precision = Any

CORR_SCALES = (0.25, 0.5, 1.0)
SUPERGLOBAL_SCALES = {1: (1.0,), 3: (0.7071, 1.0, 1.4142), 5: (0.5, 0.7071, 1.0, 1.4142, 2.0)}
GEMP_P, GEMP_EPS = 4.6, 1e-8


class CenterPivotConv4d(nn.Module):
    """Center-pivot 4-D convolution (HSNet): a 2-D conv over the query dims at a strided
    subset of key positions (`conv1`) plus a 2-D conv over the key dims at a strided subset
    of query positions (`conv2`).

    Input and output are (B, ha, wa, hb, wb, C), channels last.
    """
    features: int
    kernel: int
    stride: int
    precision: Precision = None

    @nn.compact
    def __call__(self, x):
        k, s, pad = self.kernel, self.stride, self.kernel // 2
        conv = lambda name: nn.Conv(self.features, (k, k), strides=(s, s),
                                    padding=((pad, pad), (pad, pad)), precision=self.precision,
                                    name=name)
        # conv1 over (ha, wa) at every s-th key position.
        x1 = x[:, :, :, ::s, ::s, :]
        b, ha, wa, hb, wb, c = x1.shape
        x1 = x1.transpose(0, 3, 4, 1, 2, 5).reshape(b * hb * wb, ha, wa, c)
        y1 = conv("conv1")(x1)
        oha, owa = y1.shape[1:3]
        y1 = y1.reshape(b, hb, wb, oha, owa, -1).transpose(0, 3, 4, 1, 2, 5)
        # conv2 over (hb, wb) at every s-th query position.
        x2 = x[:, ::s, ::s, :, :, :]
        b, ha, wa, hb, wb, c = x2.shape
        y2 = conv("conv2")(x2.reshape(b * ha * wa, hb, wb, c))
        y2 = y2.reshape(b, ha, wa, *y2.shape[1:])
        return y1 + y2


class CVLearner(nn.Module):
    """Four blocks of (center-pivot 4-D conv, GroupNorm(4), ReLU), mean pooling, 2-layer MLP.

    Names mirror the official nn.Sequential indices: `block2_3` is `block2.3`, `mlp_2` is
    `mlp.2`; the ReLUs take the indices in between.
    """
    precision: Precision = None

    @nn.compact
    def __call__(self, corr):
        # (out channels, kernel, stride) of each layer of each block.
        blocks = {
            1: ((16, 5, 2),),
            2: ((16, 3, 1), (32, 3, 2)),
            3: ((32, 3, 1), (32, 3, 1), (64, 3, 2)),
            4: ((64, 3, 1), (64, 3, 1), (128, 3, 1)),
        }
        x = corr
        for b, layers in blocks.items():
            for i, (ch, k, s) in enumerate(layers):
                x = CenterPivotConv4d(ch, k, s, self.precision, name=f"block{b}_{3 * i}")(x)
                x = nn.GroupNorm(num_groups=4, epsilon=1e-5, use_fast_variance=False,
                                 name=f"block{b}_{3 * i + 1}")(x)
                x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2, 3, 4))
        x = nn.relu(nn.Dense(128, precision=self.precision, name="mlp_0")(x))
        return nn.Dense(2, precision=self.precision, name="mlp_2")(x)


class CVNet(nn.Module):
    """The official `CVNet_Rerank` model (which also yields CVNet-Global and SuperGlobal).

    Attributes:
      depth: ResNet depth, 50 / 101 (152 also builds).
      width: ResNet stem width (64 for the official models; smaller for CPU demos).
      reduction_dim: size of the global descriptor.
      corr_dim: channels of the per-scale compressed local features (`conv2ds`).
      dtype: computation dtype of the backbone (float32 for parity, bfloat16 for speed).
      precision: matmul/conv precision (None = backend default; 'highest' gives float32
        accuracy on GPUs/TPUs whose default uses reduced-precision passes).
    """
    depth: int = 50
    width: int = 64
    reduction_dim: int = 2048
    corr_dim: int = 256
    dtype: Dtype = jnp.float32
    precision: Precision = None

    def setup(self):
        self.encoder_q = ResNet(self.depth, self.width, self.reduction_dim, self.dtype,
                                self.precision)
        self.conv2ds = [nn.Conv(self.corr_dim, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                                precision=self.precision) for _ in CORR_SCALES]
        self.cv_learner = CVLearner(self.precision)

    # -- CVNet-Global -------------------------------------------------------------------
    def global_descriptor(self, x, train: bool = False):
        """CVNet-Global: L2-normalised head.fc(GeM_p(stage-4)) -> (B, reduction_dim)."""
        return ops.l2_normalize(self.encoder_q(x, train))

    # -- CVNet-Rerank -------------------------------------------------------------------
    def local_features(self, x, train: bool = False):
        """Last stage-3 block before its ReLU -> (B, h/16, w/16, 16*width), float32."""
        return self.encoder_q.layer3(x, train)

    def correlation(self, fq, fk):
        """Cross-scale correlation of local features -> (B, hq, wq, hk, wk, 9), channels last.

        For each area scale s in (0.25, 0.5, 1.0) both maps are resized (bilinear,
        align_corners=True) to round(h*sqrt(s)) x round(w*sqrt(s)) and compressed by
        `conv2ds[s]`; every (query scale, key scale) pair gives a cosine-similarity 4-D
        tensor, resized back to the full (hq, wq, hk, wk) grid; the 9 are stacked query-scale
        major and clamped at 0. Channel i*3+j equals the official `corr[:, i*3+j]`.
        """
        fq, fk = fq.astype(jnp.float32), fk.astype(jnp.float32)
        (_, hq, wq, _), (_, hk, wk, _) = fq.shape, fk.shape
        qs, ks = [], []
        for scale, conv in zip(CORR_SCALES, self.conv2ds):
            qs.append(conv(ops.resize_bilinear(fq, ops.corr_scale_size(hq, wq, scale), True)))
            ks.append(conv(ops.resize_bilinear(fk, ops.corr_scale_size(hk, wk, scale), True)))
        corrs = []
        for q in qs:
            qn = jnp.sqrt(jnp.sum(q * q, axis=-1))
            for k in ks:
                kn = jnp.sqrt(jnp.sum(k * k, axis=-1))
                dots = jnp.einsum("bijc,bklc->bijkl", q, k, precision=self.precision)
                corr = dots / (qn[:, :, :, None, None] * kn[:, None, None, :, :] + 1e-8)
                corrs.append(ops.resize_bilinear(corr, (hq, wq, hk, wk), True, axes=(1, 2, 3, 4)))
        return jnp.maximum(jnp.stack(corrs, axis=-1), 0.0)

    def verification_logits(self, fq, fk):
        """CVLearner logits (B, 2) for pairs of local feature maps."""
        return self.cv_learner(self.correlation(fq, fk))

    def verification_score_from_features(self, fq, fk):
        """CVNet-Rerank score in [0, 1] (softmax[:, 1]) from local features; fq may have
        batch 1 and is then broadcast against every fk."""
        if fq.shape[0] == 1 and fk.shape[0] != 1:
            fq = jnp.broadcast_to(fq, (fk.shape[0],) + fq.shape[1:])
        return jax.nn.softmax(self.verification_logits(fq, fk), axis=-1)[:, 1]

    def verification_score(self, xq, xk):
        """CVNet-Rerank score in [0, 1] for image pairs (xq[b], xk[b]) -> (B,)."""
        return self.verification_score_from_features(self.local_features(xq),
                                                     self.local_features(xk))

    # -- SuperGlobal --------------------------------------------------------------------
    def superglobal_single_scale(self, x, rgem: bool = True, gemp: bool = True,
                                 relup: bool = True, official_quirk: bool = True):
        """SuperGlobal descriptor of one scale: head.fc(normalize(GeM+(R-GeM(s4))))."""
        act = superglobal_activations(relup, official_quirk)
        x4 = self.encoder_q.trunk(x, act).astype(jnp.float32)
        if rgem:
            x4 = ops.regional_gem(x4)
        if gemp:
            pooled = ops.gem(x4, GEMP_P, GEMP_EPS)
        else:  # the learned GeM of the checkpoint
            pooled = self.encoder_q.head.pool(x4)
        return self.encoder_q.head.fc(ops.l2_normalize(pooled))

    def superglobal_descriptor(self, x, scales: int | Sequence[float] = 3, rgem: bool = True,
                               sgem: bool = True, relup: bool = True, gemp: bool = True,
                               official_quirk: bool = True):
        """SuperGlobal descriptor -> (B, reduction_dim), *not* re-normalised (as official).

        Each scale resizes the input (bilinear, align_corners=False, no antialiasing) to
        (int(h*s), int(w*s)); `scales` is 1, 3, 5 (the official lists) or explicit factors.
        S-GeM (`sgem`) is the element-wise max of the L2-normalised per-scale descriptors;
        without it the per-scale descriptors are averaged. `official_quirk` keeps the
        official clamp of stage-1 inner activations at 0.014 when ReLU+ is off.
        """
        factors = SUPERGLOBAL_SCALES[scales] if isinstance(scales, int) else tuple(scales)
        h, w = x.shape[1:3]
        descs = []
        for s in factors:
            xs = ops.resize_bilinear(x, ops.scaled_size(h, w, s), align_corners=False)
            descs.append(self.superglobal_single_scale(xs, rgem, gemp, relup, official_quirk))
        stacked = jnp.stack(descs, 0)
        if sgem:
            return jnp.max(ops.l2_normalize(stacked), axis=0)
        return jnp.mean(stacked, axis=0)

    def __call__(self, xq, xk, train: bool = False):
        """Touches every parameter (for `init`): (global descriptor of xq, logits of (xq, xk))."""
        g = self.global_descriptor(xq, train)
        return g, self.verification_logits(self.local_features(xq, train),
                                           self.local_features(xk, train))


def arch_kwargs(arch) -> dict:
    """The architecture fields of a model config (depth, width, reduction_dim, corr_dim)."""
    return {k: int(arch[k]) for k in ("depth", "width", "reduction_dim", "corr_dim") if k in arch}


@functools.lru_cache(maxsize=16)
def _abstract_variables(arch_items: tuple) -> dict:
    model = CVNet(**dict(arch_items))
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(lambda a, b: model.init(jax.random.PRNGKey(0), a, b), x, x)


def abstract_variables(arch) -> dict:
    """Shapes and dtypes (jax.ShapeDtypeStruct) of every variable of a CVNet, without
    allocating or computing anything."""
    return _abstract_variables(tuple(sorted(arch_kwargs(arch).items())))


def init(arch, seed: int = 0) -> dict:
    """Randomly initialised variables (Flax default initialisers; GeM p = 3)."""
    model = CVNet(**arch_kwargs(arch))
    x = jnp.zeros((1, 64, 64, 3), jnp.float32)
    return jax.jit(model.init)(jax.random.PRNGKey(seed), x, x)


def resolve_precision(dtype, precision):
    """"auto" -> "highest" (float32-exact matmuls and convs, also on GPUs/TPUs whose default
    uses reduced-precision passes) for float32 models, the backend default otherwise."""
    if precision == "auto":
        return "highest" if jnp.dtype(dtype) == jnp.float32 else None
    return precision


def load(path, *, depth: int | None = None, dtype=jnp.float32, precision="auto"):
    """big_vision-style loader: (CVNet module, variables) from an official `.pyth`/`.pth`
    checkpoint or a directory written by `python -m scvnet_jax.convert`.

    precision "auto" means float32-exact matmuls/convs ("highest") for float32 models (so
    GPUs/TPUs match the official outputs) and the backend default for other dtypes.
    """
    from scvnet_jax import convert  # the converter imports this module
    arch, variables = convert.read_checkpoint(path, depth=depth)
    return CVNet(**arch, dtype=dtype, precision=resolve_precision(dtype, precision)), variables
