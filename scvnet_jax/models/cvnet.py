"""CVNet (global descriptor + Correlation Verification reranker) and SuperGlobal descriptors.

One Flax module, `CVNet`, owns the three parameter groups of an official CVNet checkpoint:
`encoder_q` (the ResNet, see resnet.py), `conv2ds_{0,1,2}` (per-scale 3x3 channel
compression) and `cv_learner` (4-D convolutional verifier). Its methods are the models:

  global_descriptor      CVNet-Global: L2-normalised head.fc(GeM_p(s4)).
  local_features         last stage-3 block before its ReLU.
  corr_features          per image: the compressed, normalised maps of the 3 scales.
  correlate              cross-scale 4-D correlation of two corr_features batches.
  correlation            the same from two local feature maps.
  verification_logits    CVLearner on that correlation -> (B, 2).
  verification_score     softmax(logits)[:, 1] for image pairs.
  superglobal_descriptor SuperGlobal's GeM+ / Regional-GeM / Scale-GeM / ReLU+ descriptor.

All methods take NHWC float arrays, normalised the official way (BGR, mean/std in
`scvnet_jax.data.preprocess`) and work with plain `init`/`apply(..., method=...)`.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scvnet_jax.models import ops
from scvnet_jax.models.arch import Arch
from scvnet_jax.models.resnet import ResNet, stage_valid, superglobal_activations

Dtype = Any
Precision = Any

CORR_SCALES = (0.25, 0.5, 1.0)
SUPERGLOBAL_SCALES = {1: (1.0,), 3: (0.7071, 1.0, 1.4142), 5: (0.5, 0.7071, 1.0, 1.4142, 2.0)}
GEMP_P, GEMP_EPS = 4.6, 1e-8


class CenterPivotConv4d(nn.Module):
    """Center-pivot 4-D convolution (HSNet): a 2-D conv over the query dims at a strided
    subset of key positions (`conv1`) plus a 2-D conv over the key dims at a strided subset
    of query positions (`conv2`).

    Input and output are (B, ha, wa, hb, wb, C), channels last. The input must be zero
    outside its valid region when the batch is padded; the output is valid on
    `valid_after(valid4, stride)`.
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


class GroupNorm(nn.Module):
    """GroupNorm over all non-batch axes (PyTorch's nn.GroupNorm for any rank), with
    statistics over the valid region only when `valid` (B, n_spatial) is given."""
    num_groups: int = 4
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, valid=None):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        n_spatial = x.ndim - 2
        g = x.reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
        axes = tuple(range(1, 1 + n_spatial)) + (x.ndim,)
        if valid is None:
            mean = jnp.mean(g, axis=axes, keepdims=True)
            var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
        else:
            m = ops.valid_mask(valid, x.shape[1:1 + n_spatial])[..., None]  # (B, *sp, 1, 1)
            count = (jnp.prod(valid, axis=1) * (c // self.num_groups)).astype(x.dtype)
            count = count.reshape((-1,) + (1,) * (g.ndim - 1))
            mean = jnp.sum(jnp.where(m, g, 0.0), axis=axes, keepdims=True) / count
            var = jnp.sum(jnp.where(m, jnp.square(g - mean), 0.0), axis=axes,
                          keepdims=True) / count
        y = ((g - mean) / jnp.sqrt(var + self.epsilon)).reshape(x.shape)
        return y * scale + bias


class CVLearner(nn.Module):
    """Four blocks of (center-pivot 4-D conv, GroupNorm(4), ReLU), mean pooling, 2-layer MLP.

    Names mirror the official nn.Sequential indices: `block2_3` is `block2.3`, `mlp_2` is
    `mlp.2`; the ReLUs take the indices in between. `valid4` (B, 4) gives the valid
    (ha, wa, hb, wb) of a padded correlation batch (zero outside it), or None.
    """
    precision: Precision = None

    @nn.compact
    def __call__(self, corr, valid4=None):
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
                if valid4 is not None and s != 1:
                    valid4 = ops.valid_after(valid4, s)
                x = GroupNorm(4, 1e-5, name=f"block{b}_{3 * i + 1}")(x, valid4)
                x = ops.mask_valid(nn.relu(x), valid4, n_spatial=4)
        x = ops.mean_valid(x, valid4, n_spatial=4)
        x = nn.relu(nn.Dense(128, precision=self.precision, name="mlp_0")(x))
        return nn.Dense(2, precision=self.precision, name="mlp_2")(x)


class CVNet(nn.Module):
    """The official `CVNet_Rerank` model (which also yields CVNet-Global and SuperGlobal).

    Attributes:
      arch: depth, width, reduction_dim and corr_dim (see `Arch`).
      dtype: computation dtype of the backbone (float32 for parity, bfloat16 for speed).
      precision: matmul/conv precision (None = backend default; 'highest' gives float32
        accuracy on GPUs/TPUs whose default uses reduced-precision passes).
    """
    arch: Arch = Arch()
    dtype: Dtype = jnp.float32
    precision: Precision = None

    def setup(self):
        a = self.arch
        self.encoder_q = ResNet(a.depth, a.width, a.reduction_dim, self.dtype, self.precision)
        self.conv2ds = [nn.Conv(a.corr_dim, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                                precision=self.precision) for _ in CORR_SCALES]
        self.cv_learner = CVLearner(self.precision)

    # -- CVNet-Global -------------------------------------------------------------------
    # `valid` arguments: (B, 2) int32 valid (h, w) of each image of a batch padded at the
    # bottom/right (see ops.py); results then equal those of the unpadded images.

    def global_descriptor(self, x, train: bool = False, valid=None):
        """CVNet-Global: L2-normalised head.fc(GeM_p(stage-4)) -> (B, reduction_dim)."""
        return ops.l2_normalize(self.encoder_q(x, train, valid))

    # -- CVNet-Rerank -------------------------------------------------------------------
    def local_features(self, x, train: bool = False, valid=None):
        """Last stage-3 block before its ReLU -> (B, h/16, w/16, 16*width), float32; for a
        padded batch, valid on `stage_valid(valid, 3)` and zero elsewhere."""
        return self.encoder_q.layer3(x, train, valid)

    def corr_features(self, f, plans: "FeaturePlans | None" = None):
        """Per image, what the cross-scale correlation needs of it -> (B, h, w, 3, corr_dim).

        For each area scale s in (0.25, 0.5, 1.0) the map is resized (bilinear,
        align_corners=True) to round(h*sqrt(s)) x round(w*sqrt(s)), compressed by
        `conv2ds[s]`, L2-normalised per cell, and resized back to (h, w). The official code
        resizes each *pair's* 4-D cosine-similarity tensor back instead; bilinear resizing
        is linear along each axis, so resizing the normalised features first gives the same
        tensor (to float rounding, and to the official 1e-8 in the cosine's denominator),
        computed once per image instead of once per pair.

        For a padded feature batch pass `plans` (`feature_plans`): the result is then zero
        outside each item's valid (h, w).
        """
        f = f.astype(jnp.float32)
        h, w = f.shape[1:3]
        out = []
        for i, scale in enumerate(CORR_SCALES):
            conv = self.conv2ds[i]
            if plans is None:
                x = ops.resize_bilinear(f, ops.corr_scale_size(h, w, scale), True)
                x = ops.resize_bilinear(ops.l2_normalize(conv(x)), (h, w), True)
            elif scale == 1.0:   # round(h * 1) = h: both resizes are the identity
                x = ops.l2_normalize(ops.mask_valid(conv(f), plans.valid))
            else:
                (ph, pw, valid), (bh, bw) = plans.down[i], plans.up[i]
                x = ops.resize_by_plan(ops.resize_by_plan(f, 1, ph), 2, pw)
                x = ops.l2_normalize(ops.mask_valid(conv(x), valid))
                x = ops.resize_by_plan(ops.resize_by_plan(x, 1, bh), 2, bw)
            out.append(x)
        return jnp.stack(out, axis=3)

    def correlate(self, cq, ck):
        """Cross-scale correlation of two `corr_features` batches -> (B, hq, wq, hk, wk, 9),
        channel i*3+j = query scale i against key scale j, clamped at 0 (one matrix product
        per pair)."""
        corr = jnp.einsum("bijsc,bkltc->bijklst", cq, ck, precision=self.precision)
        return jnp.maximum(corr.reshape(corr.shape[:5] + (-1,)), 0.0)

    def correlation(self, fq, fk, plans: "CorrelationPlans | None" = None):
        """Cross-scale correlation of local features -> (B, hq, wq, hk, wk, 9), channels last.

        Every (query scale, key scale) pair of `corr_features` gives a cosine-similarity 4-D
        tensor on the full (hq, wq, hk, wk) grid; the 9 are stacked query-scale major and
        clamped at 0. Channel i*3+j equals the official `corr[:, i*3+j]`.

        For padded feature batches pass `plans` (`correlation_plans`): the result is then
        zero outside each pair's valid (hq, wq, hk, wk).
        """
        return self.correlate(self.corr_features(fq, None if plans is None else plans.query),
                              self.corr_features(fk, None if plans is None else plans.key))

    def verification_logits(self, fq, fk, plans: "CorrelationPlans | None" = None):
        """CVLearner logits (B, 2) for pairs of local feature maps."""
        valid4 = None if plans is None else plans.valid4
        return self.cv_learner(self.correlation(fq, fk, plans), valid4)

    def verification_score_from_features(self, fq, fk, plans: "CorrelationPlans | None" = None):
        """CVNet-Rerank score in [0, 1] (softmax[:, 1]) from local features; fq may have
        batch 1 and is then broadcast against every fk."""
        if fq.shape[0] == 1 and fk.shape[0] != 1:
            fq = jnp.broadcast_to(fq, (fk.shape[0],) + fq.shape[1:])
        return jax.nn.softmax(self.verification_logits(fq, fk, plans), axis=-1)[:, 1]

    def verification_score_from_corr_features(self, cq, ck, valid4=None):
        """CVNet-Rerank score in [0, 1] from `corr_features` of both sides (zero-padded
        batches: `valid4` (B, 4) = valid (hq, wq, hk, wk), or None)."""
        return jax.nn.softmax(self.cv_learner(self.correlate(cq, ck), valid4), axis=-1)[:, 1]

    def verification_score(self, xq, xk):
        """CVNet-Rerank score in [0, 1] for image pairs (xq[b], xk[b]) -> (B,)."""
        return self.verification_score_from_features(self.local_features(xq),
                                                     self.local_features(xk))

    # -- SuperGlobal --------------------------------------------------------------------
    def superglobal_single_scale(self, x, rgem: bool = True, gemp: bool = True,
                                 relup: bool = True, official_quirk: bool = True, valid=None):
        """SuperGlobal descriptor of one scale: head.fc(normalize(GeM+(R-GeM(s4))))."""
        act = superglobal_activations(relup, official_quirk)
        x4 = self.encoder_q.trunk(x, act, valid=valid).astype(jnp.float32)
        v4 = stage_valid(valid, 4)
        if rgem:
            x4 = ops.regional_gem(x4, valid=v4)
        if gemp:
            pooled = ops.gem(x4, GEMP_P, GEMP_EPS, v4)
        else:  # the learned GeM of the checkpoint
            pooled = self.encoder_q.head.pool(x4, v4)
        return self.encoder_q.head.fc(ops.l2_normalize(pooled))

    def superglobal_descriptor(self, x, scales: int | Sequence[float] = 3, rgem: bool = True,
                               sgem: bool = True, relup: bool = True, gemp: bool = True,
                               official_quirk: bool = True, plans: "tuple | None" = None):
        """SuperGlobal descriptor -> (B, reduction_dim), *not* re-normalised (as official).

        Each scale resizes the input (bilinear, align_corners=False, no antialiasing) to
        (int(h*s), int(w*s)); `scales` is 1, 3, 5 (the official lists) or explicit factors.
        S-GeM (`sgem`) is the element-wise max of the L2-normalised per-scale descriptors;
        without it the per-scale descriptors are averaged. `official_quirk` keeps the
        official clamp of stage-1 inner activations at 0.014 when ReLU+ is off.
        For a padded batch pass `plans = superglobal_plans(valid, x.shape[1:3], scales)`.
        """
        factors = superglobal_factors(scales)
        h, w = x.shape[1:3]
        descs = []
        for i, s in enumerate(factors):
            if plans is None:
                xs, valid = ops.resize_bilinear(x, ops.scaled_size(h, w, s), False), None
            else:
                ph, pw, valid = plans[i]
                xs = ops.resize_by_plan(ops.resize_by_plan(x, 1, ph), 2, pw)
            descs.append(self.superglobal_single_scale(xs, rgem, gemp, relup, official_quirk,
                                                       valid))
        stacked = jnp.stack(descs, 0)
        if sgem:
            return jnp.max(ops.l2_normalize(stacked), axis=0)
        return jnp.mean(stacked, axis=0)

    def __call__(self, xq, xk, train: bool = False):
        """Touches every parameter (for `init`): (global descriptor of xq, logits of (xq, xk))."""
        g = self.global_descriptor(xq, train)
        return g, self.verification_logits(self.local_features(xq, train),
                                           self.local_features(xk, train))


def superglobal_factors(scales) -> tuple[float, ...]:
    return SUPERGLOBAL_SCALES[scales] if isinstance(scales, int) else tuple(scales)


def superglobal_plans(valid, bucket_hw, scales) -> tuple:
    """Host-side resize plans for `superglobal_descriptor` on a padded batch: per scale,
    (AxisPlan h, AxisPlan w, valid (B, 2)) from each image's valid (h, w) to
    (int(h*s), int(w*s)), inside the bucket (int(H*s), int(W*s))."""
    return tuple(ops.scale_plan(valid, bucket_hw, functools.partial(ops.scaled_size, scale=s),
                                False) for s in superglobal_factors(scales))


class FeaturePlans(NamedTuple):
    """Host-side plans for `corr_features` on a padded local-feature batch.

    down: per area scale, (AxisPlan h, AxisPlan w, scaled valid (B, 2)) resizing each item
    from its valid size to the scale; up: per area scale, the (h, w) AxisPlans resizing it
    back to the valid size; valid: (B, 2) valid (h, w)."""
    down: tuple
    up: tuple
    valid: Any


class CorrelationPlans(NamedTuple):
    """Plans for `correlation` on padded pairs: each side's `FeaturePlans`, and valid4
    (B, 4) = valid (hq, wq, hk, wk)."""
    query: FeaturePlans
    key: FeaturePlans
    valid4: Any


def feature_plans(valid, bucket) -> FeaturePlans:
    """Plans for local features of valid sizes `valid` (B, 2) in a feature bucket (h, w)."""
    valid = np.asarray(valid, np.int64)
    down, up = [], []
    for scale in CORR_SCALES:
        size_fn = functools.partial(ops.corr_scale_size, area_scale=scale)
        down.append(ops.scale_plan(valid, bucket, size_fn, True))
        sv = down[-1][2]
        up.append((ops.axis_plan(sv[:, 0], valid[:, 0], int(bucket[0]), True),
                   ops.axis_plan(sv[:, 1], valid[:, 1], int(bucket[1]), True)))
    return FeaturePlans(tuple(down), tuple(up), valid.astype(np.int32))


def correlation_plans(valid_q, valid_k, bucket_q, bucket_k) -> CorrelationPlans:
    """Plans for pairs (query b, key b) of local features with valid sizes valid_q[b],
    valid_k[b] (B, 2) inside feature buckets bucket_q, bucket_k (h, w)."""
    valid4 = np.concatenate([np.asarray(valid_q), np.asarray(valid_k)], 1).astype(np.int32)
    return CorrelationPlans(feature_plans(valid_q, bucket_q), feature_plans(valid_k, bucket_k),
                            valid4)


@functools.lru_cache(maxsize=16)
def abstract_variables(arch: Arch) -> dict:
    """Shapes and dtypes (jax.ShapeDtypeStruct) of every variable of a CVNet, without
    allocating or computing anything."""
    model = CVNet(arch)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(lambda a, b: model.init(jax.random.PRNGKey(0), a, b), x, x)


def init(arch: Arch, seed: int = 0) -> dict:
    """Randomly initialised variables (Flax default initialisers; GeM p = 3)."""
    model = CVNet(arch)
    x = jnp.zeros((1, 64, 64, 3), jnp.float32)
    return jax.jit(model.init)(jax.random.PRNGKey(seed), x, x)


def resolve_precision(dtype, precision):
    """"auto" -> "highest" (float32-exact matmuls and convs, also on GPUs/TPUs whose default
    uses reduced-precision passes) for float32 models, the backend default otherwise."""
    if precision == "auto":
        return "highest" if jnp.dtype(dtype) == jnp.float32 else None
    return precision
