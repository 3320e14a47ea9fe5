"""AMES (Asymmetric and Memory-Efficient Similarity, Suma et al., ECCV 2024; github
pavelsuma/ames): a transformer that scores a (query, database image) pair from their local
descriptors.

    tokens = [matching token, query tokens (Q), database tokens (T)]
    each decoder layer: self-attention within each image, then cross-attention between
    the two images (the matching token attends to, and is seen by, every token in both),
    then a feed-forward block; logit = classifier(output of the matching token).

Submodule and parameter names follow the official state dict, so a checkpoint converts with
the table of `scvnet_jax.convert.mapping` (`mtc_token`, `remap_local.{0,1,2}`,
`decoder.layers.{i}.{self_attn,cross_attn}.{in_proj_weight,in_proj_bias,out_proj}`,
`.linear1`, `.linear2`, `.norm{1,2,3}`, `decoder.norm` (pre-norm only), `classifier`).

Exact semantics of the official `AMES.forward`:
  * descriptors are L2-normalised (F.normalize, eps 1e-12), then projected by `remap_local`:
    full precision (fp): Linear(local_dim, model_dim) + LayerNorm; binarized (dist):
    `BinarizationLayer` (normalise again, @ W (local_dim, bits = model_dim), sign: codes in
    {-1, 0, +1}) + Linear(model_dim, model_dim) + LayerNorm;
  * in eval mode the fp model rounds the *database* tokens (not the query's) to float16
    after the projection (`.half().float()`; from float64 through float32, as PyTorch's
    cast does); in training mode it does not, and dist uses erf(x / sqrt(2e-6)) instead of
    sign (the trainable binarization's smooth surrogate);
  * masks: True = padding, applied to keys only (`key_padding_mask`); the self-attention
    mask blocks query <-> database, the cross-attention mask blocks query <-> query and
    database <-> database; the matching token is never masked (here the blocked pairs are
    not computed at all: each block of rows attends to its open keys only, `key_sets`);
  * nn.MultiheadAttention: one packed in-projection (q, k, v stacked), softmax over
    (q / sqrt(head_dim)) . k, out_proj; no dropout anywhere (the official layer has none);
  * post-norm layers (the official configuration): x = norm1(x + sa(x)), norm2(x + ca(x)),
    norm3(x + ff(x)); pre-norm (`normalize_before`): x + sa(norm1(x)), ... and a final
    `decoder.norm`; LayerNorm eps 1e-5; activation ReLU (or exact GELU).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LN_EPS = 1e-5
NORM_EPS = 1e-12
SIGMA = 1e-6                 # BinarizationLayer's sigma: erf(x / sqrt(2 sigma)) in training
ACTIVATIONS = ("relu", "gelu")
Precision = Any


@dataclasses.dataclass(frozen=True)
class AMESArch:
    """The shape of an AMES model: the official `AMES(...)` arguments. Defaults: the official
    conf/model/ames.yaml (model_dim 128, 2 heads, 5 layers, FF 1024, ReLU, post-norm) with
    CVNet's 1024-d local descriptors (DINOv2's are 768-d). nhead is not stored in
    checkpoints. binarized: the `dist` variant, whose remap_local.0.W (local_dim, model_dim)
    projects descriptors to model_dim bits."""
    local_dim: int = 1024
    model_dim: int = 128
    nhead: int = 2
    num_encoder_layers: int = 5
    dim_feedforward: int = 1024
    binarized: bool = False
    activation: str = "relu"
    normalize_before: bool = False

    kind = "ames"
    FIELDS = ("local_dim", "model_dim", "nhead", "num_encoder_layers", "dim_feedforward",
              "binarized", "activation", "normalize_before")
    INTS = ("local_dim", "model_dim", "nhead", "num_encoder_layers", "dim_feedforward")

    def __post_init__(self):
        for f in self.INTS:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"AMES field {f} must be a positive integer, got {v!r}")
        if self.model_dim % self.nhead:
            raise ValueError(f"AMES model_dim {self.model_dim} is not a multiple of nhead "
                             f"{self.nhead}")
        for f in ("binarized", "normalize_before"):
            if not isinstance(getattr(self, f), (bool, np.bool_)):
                raise ValueError(f"AMES {f} must be true or false, got {getattr(self, f)!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"AMES activation must be one of {ACTIVATIONS}, got "
                             f"{self.activation!r}")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "AMESArch":
        missing = [f for f in cls.FIELDS if f not in m]
        if missing:
            raise ValueError(f"AMES fields missing: {', '.join(missing)}")
        kw = {f: m[f] for f in cls.FIELDS}
        for f in cls.INTS:
            if isinstance(kw[f], float) and kw[f].is_integer():
                kw[f] = int(kw[f])
        return cls(**kw)

    def asdict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}

    def __str__(self) -> str:
        return "AMES (" + ", ".join(f"{k}={v}" for k, v in self.asdict().items()) + ")"


def l2_normalize(x, axis: int = -1):
    """F.normalize: x / max(||x||, 1e-12)."""
    return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True)),
                           NORM_EPS)


def _dense(features: int, name: str | None, precision):
    # the official _init_weights: trunc_normal_(std=.02) (a plain normal at +-2), zero bias
    return nn.Dense(features, precision=precision, name=name,
                    kernel_init=nn.initializers.normal(0.02))


def _layer_norm(name: str | None):
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=name)


def round_to_float16(x):
    """The official eval-time `.half().float()` of the database tokens, in x's dtype: from
    float64 through float32 (PyTorch's double -> half cast goes through float)."""
    return x.astype(jnp.float32).astype(jnp.float16).astype(x.dtype)


def key_sets(q_len: int, t_len: int, kind: str):
    """Which keys each row block attends to, as (rows, [key slices]) over the token layout
    [matching token, Q query tokens, T database tokens]: the official sa_mask / ca_mask
    without their blocked entries. Self-attention ("self"): the matching token sees all,
    query tokens see the matching token and the query, database tokens the matching token
    and the database; cross-attention ("cross"): query tokens see the matching token and the
    database, database tokens the matching token and the query."""
    n, m, q, t = 1 + q_len + t_len, slice(0, 1), slice(1, 1 + q_len), slice(1 + q_len, None)
    if kind == "self":
        return ((m, [slice(0, n)]), (q, [slice(0, 1 + q_len)]), (t, [m, t]))
    if kind == "cross":
        return ((m, [slice(0, n)]), (q, [m, t]), (t, [slice(0, 1 + q_len)]))
    raise ValueError(f"attention kind must be 'self' or 'cross', got {kind!r}")


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention (batch_first, self-attention x, x, x): `in_proj_weight`
    (3D, D) and `in_proj_bias` (3D,) in PyTorch layout, `out_proj`.

    The official model masks a full (N, N) attention (`sa_mask` / `ca_mask`, N = 1 + Q + T);
    here each block of rows attends only to the keys its mask leaves open (`key_sets`), so
    the blocked logits, which get exactly zero weight there, are never computed: the same
    softmax (to the summation order's rounding) at a fraction of the cost (cross-attention
    Q x T + T x Q logits instead of N x N)."""
    dim: int
    nhead: int
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x, pad, q_len: int, kind: str):
        """x (B, N, D); pad (B, N) bool, True = a padded token (never a key); q_len: Q;
        kind: "self" or "cross" (`key_sets`)."""
        d, h = self.dim, self.nhead
        w = self.param("in_proj_weight", nn.initializers.xavier_uniform(), (3 * d, d))
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,))
        qkv = jnp.einsum("bnd,ed->bne", x, w.astype(x.dtype),
                         precision=self.precision) + bias.astype(x.dtype)
        b, n, _ = x.shape
        # heads in front: every block below is one plain batched matrix product
        q, k, v = qkv.reshape(b, n, 3, h, d // h).transpose(2, 0, 3, 1, 4)   # (B, h, N, c)
        q = q * math.sqrt(1.0 / (d // h))
        take = lambda a, keys, axis: jnp.concatenate(  # noqa: E731
            [a[(slice(None),) * axis + (s,)] for s in keys], axis)
        outs = []
        for rows, keys in key_sets(q_len, n - 1 - q_len, kind):
            logits = jnp.einsum("bhnc,bhmc->bhnm", q[:, :, rows], take(k, keys, 2),
                                precision=self.precision)
            logits = jnp.where(take(pad, keys, 1)[:, None, None, :], -jnp.inf, logits)
            p = jax.nn.softmax(logits, axis=-1)
            outs.append(jnp.einsum("bhnm,bhmc->bhnc", p, take(v, keys, 2),
                                   precision=self.precision))
        out = jnp.concatenate(outs, 2).transpose(0, 2, 1, 3)
        return _dense(d, "out_proj", self.precision)(out.reshape(b, n, d))


class DecoderLayer(nn.Module):
    """`decoder.layers.{i}`: self-attention, cross-attention, feed-forward."""
    arch: AMESArch
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x, pad, q_len: int):
        a, p = self.arch, self.precision
        sa = MultiheadAttention(a.model_dim, a.nhead, p, name="self_attn")
        ca = MultiheadAttention(a.model_dim, a.nhead, p, name="cross_attn")
        lin1 = _dense(a.dim_feedforward, "linear1", p)
        lin2 = _dense(a.model_dim, "linear2", p)
        n1, n2, n3 = _layer_norm("norm1"), _layer_norm("norm2"), _layer_norm("norm3")
        act = (jax.nn.relu if a.activation == "relu"
               else (lambda y: jax.nn.gelu(y, approximate=False)))

        def ff(y):
            return lin2(act(lin1(y)))

        if a.normalize_before:
            x = x + sa(n1(x), pad, q_len, "self")
            x = x + ca(n2(x), pad, q_len, "cross")
            return x + ff(n3(x))
        x = n1(x + sa(x, pad, q_len, "self"))
        x = n2(x + ca(x, pad, q_len, "cross"))
        return n3(x + ff(x))


class Decoder(nn.Module):
    """`decoder`: the layers (and `norm` after them, pre-norm models only)."""
    arch: AMESArch
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x, pad, q_len: int):
        outs = []
        for i in range(self.arch.num_encoder_layers):
            x = DecoderLayer(self.arch, self.precision, name=f"layers_{i}")(x, pad, q_len)
            outs.append(x)
        if self.arch.normalize_before:
            x = _layer_norm("norm")(x)
        return x, outs


class Binarization(nn.Module):
    """`remap_local.0` of dist models (the official BinarizationLayer): sign(normalize(x) @ W)
    in eval mode, erf(normalize(x) @ W / sqrt(2 sigma)) in training. W (local_dim, bits) is
    read from the checkpoint (its ITQ projection)."""
    local_dim: int
    bits: int
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x, train: bool = False):
        w = self.param("W", nn.initializers.normal(1.0), (self.local_dim, self.bits))
        y = jnp.einsum("...d,db->...b", l2_normalize(x), w.astype(x.dtype),
                       precision=self.precision)
        if train:
            return jax.scipy.special.erf(y / float(np.sqrt(2 * SIGMA)))
        return jnp.sign(y)


class AMES(nn.Module):
    """The official `AMES` model. The forward is split where a store keeps the database
    side: `encode_db` (what the decoder consumes for a database image: float16 tokens, or
    dist codes) and `from_db` (the rest)."""
    arch: AMESArch = AMESArch()
    precision: Precision = "highest"

    def setup(self):
        a, p = self.arch, self.precision
        self.mtc_token = self.param("mtc_token", nn.initializers.normal(0.02), (a.model_dim,))
        if a.binarized:
            self.remap_local_0 = Binarization(a.local_dim, a.model_dim, p)
            self.remap_local_1 = _dense(a.model_dim, None, p)
            self.remap_local_2 = _layer_norm(None)
        else:
            self.remap_local_0 = _dense(a.model_dim, None, p)
            self.remap_local_1 = _layer_norm(None)
        self.decoder = Decoder(a, p)
        self.classifier = _dense(1, None, p)

    # -- the projection (`remap_local`) ----------------------------------------------------

    def codes(self, local, train: bool = False):
        """dist: the binary codes (..., bits) in {-1, 0, 1} (erf surrogate in training)."""
        return self.remap_local_0(l2_normalize(local), train)

    def project_codes(self, codes):
        """dist: tokens from codes (remap_local.1, .2)."""
        return self.remap_local_2(self.remap_local_1(codes.astype(self.mtc_token.dtype)))

    def remap(self, local, train: bool = False):
        """`remap_local(normalize(local))`: tokens (..., model_dim), before any rounding."""
        if self.arch.binarized:
            return self.project_codes(self.codes(local, train))
        return self.remap_local_1(self.remap_local_0(l2_normalize(local)))

    def encode_db(self, db_local):
        """Eval mode: what the decoder consumes of a database image: fp the tokens rounded to
        float16 (returned as float16), dist the codes (float, in {-1, 0, 1})."""
        if self.arch.binarized:
            return self.codes(db_local)
        return self.remap(db_local).astype(jnp.float32).astype(jnp.float16)

    # -- the decoder -----------------------------------------------------------------------

    def decode(self, src, src_mask, tgt, tgt_mask):
        """(logits (B,), final tokens (B, 1 + Q + T, D), [each layer's output]) from query
        tokens src (B, Q, D) and database tokens tgt (B, T, D); masks True = padding."""
        b, q_len, _ = src.shape
        mtc = jnp.broadcast_to(self.mtc_token.astype(src.dtype), (b, 1, src.shape[-1]))
        x = jnp.concatenate([mtc, src, tgt.astype(src.dtype)], axis=1)
        pad = jnp.concatenate([jnp.zeros((b, 1), bool), src_mask.astype(bool),
                               tgt_mask.astype(bool)], axis=1)               # (B, N)
        out, layers = self.decoder(x, pad, q_len)
        return self.classifier(out[:, 0])[:, 0], out, layers

    def from_tokens(self, src, src_mask, db, tgt_mask):
        """Eval-mode logits (B,) from query tokens (`remap`) and `encode_db`'s output."""
        tgt = self.project_codes(db) if self.arch.binarized else db.astype(self.mtc_token.dtype)
        return self.decode(src, src_mask, tgt, tgt_mask)[0]

    def from_db(self, src_local, src_mask, db, tgt_mask):
        """Eval-mode logits (B,) from the query's descriptors and `encode_db`'s output."""
        return self.from_tokens(self.remap(src_local), src_mask, db, tgt_mask)

    def __call__(self, src_local, src_mask, tgt_local, tgt_mask, train: bool = False,
                 return_all: bool = False):
        """The official forward: logits (B,) of pairs of (B, Q, local_dim) query and
        (B, T, local_dim) database descriptors (masks True = padding). With return_all, a
        dict of the intermediates too (remapped tokens, codes, each layer, final tokens)."""
        src = self.remap(src_local, train)
        tgt = self.remap(tgt_local, train)
        tgt_in = tgt if (train or self.arch.binarized) else round_to_float16(tgt)
        sim, out, layers = self.decode(src, src_mask, tgt_in, tgt_mask)
        if not return_all:
            return sim
        extra = {"src_remap": src, "tgt_remap": tgt, "tgt_remap_f16": tgt_in,
                 "tokens_out": out, "layers": layers}
        if self.arch.binarized:
            extra["src_binary"] = self.codes(src_local, train)
            extra["tgt_binary"] = self.codes(tgt_local, train)
        return sim, extra


def abstract_variables(arch: AMESArch) -> dict:
    """{'params': ...} shapes of an AMES model, without computing anything."""
    x = jax.ShapeDtypeStruct((1, 1, arch.local_dim), jnp.float32)
    m = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
    return jax.eval_shape(lambda *a: AMES(arch).init(jax.random.PRNGKey(0), *a), x, m, x, m)


def init(arch: AMESArch, seed: int = 0) -> dict:
    """Fresh variables: normal(0.02) linear weights and matching token, zero biases, xavier
    in-projections (as nn.MultiheadAttention), LayerNorm 1/0; dist W: standard normal (the
    official draws it so when no ITQ file is given)."""
    x, m = jnp.zeros((1, 1, arch.local_dim), jnp.float32), jnp.zeros((1, 1), bool)
    return AMES(arch).init(jax.random.PRNGKey(seed), x, m, x, m)
