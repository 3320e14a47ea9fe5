"""CSA (Contextual Similarity Aggregation with self-attention, Ouyang et al., NeurIPS 2021;
github MCC-WH/CSA): a small transformer over *affinity features*.

Each of a query's top-k candidates (and the query itself, token 0) is described by its
similarities to the query and to the first-stage top anchor_len - 1 database items (a row
of anchor_len numbers); `topk_proj` embeds the rows, pre-norm transformer blocks mix them,
and a candidate's score is the cosine of its output token with the query's.

Submodule names follow the official state dict (`topk_proj`, `feature_align.layers.0`,
`blocks.{i}.norm1`, `.attn.qkv`, `.attn.proj`, `.norm2`, `.mlp.fc1`, `.mlp.fc2`), so a
checkpoint converts with the same table as CVNet's (`scvnet_jax.convert.mapping`).
Exact semantics of the official `RerankTransformer` and `Transformer_Block`: LayerNorm eps
1e-5 with the two-pass variance, exact (erf) GELU, attention scale head_dim^-0.5, the
MLP hidden size int(embed_dim * mlp_ratio), F.normalize's eps 1e-12, temperature 2 in the
training similarity. In training mode the official dropouts run (input, embedding,
attention probabilities, projections, MLP) and DropPath (stochastic depth, rates
linspace(0, drop_path_rate, depth)); they need a 'dropout' RNG.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

TEMPERATURE = 2.0
LN_EPS = 1e-5
NORM_EPS = 1e-12
Precision = Any


@dataclasses.dataclass(frozen=True)
class CSAArch:
    """The shape of a CSA model. anchor_len: affinity features per token (the official
    `topk_dim` / `--anchor_len` / `--sim_len`); num_heads is not stored in official
    checkpoints (their scripts use 12)."""
    anchor_len: int = 512
    embed_dim: int = 768
    depth: int = 2
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True

    kind = "csa"
    FIELDS = ("anchor_len", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")

    def __post_init__(self):
        for f in ("anchor_len", "embed_dim", "depth", "num_heads"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"CSA field {f} must be a positive integer, got {v!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"CSA embed_dim {self.embed_dim} is not a multiple of num_heads "
                             f"{self.num_heads}")
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0
                and int(self.embed_dim * self.mlp_ratio) > 0):
            raise ValueError(f"CSA mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if not isinstance(self.qkv_bias, (bool, np.bool_)):
            raise ValueError(f"CSA qkv_bias must be true or false, got {self.qkv_bias!r}")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "CSAArch":
        missing = [f for f in cls.FIELDS if f not in m]
        if missing:
            raise ValueError(f"CSA fields missing: {', '.join(missing)}")
        kw = {f: m[f] for f in cls.FIELDS}
        for f in ("anchor_len", "embed_dim", "depth", "num_heads"):
            if isinstance(kw[f], float) and kw[f].is_integer():
                kw[f] = int(kw[f])
        return cls(**kw)

    def asdict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}

    @property
    def hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def __str__(self) -> str:
        return "CSA (" + ", ".join(f"{k}={v}" for k, v in self.asdict().items()) + ")"


def _dense(features: int, name: str, precision, use_bias: bool = True):
    # the official _init_weights: trunc_normal_(std=.02) truncates at +-2 absolute, i.e.
    # 100 standard deviations: a plain normal; zero biases
    return nn.Dense(features, use_bias=use_bias, precision=precision, name=name,
                    kernel_init=nn.initializers.normal(0.02))


def _layer_norm(name: str):
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=name)


def l2_normalize(x, axis: int = -1):
    """F.normalize: x / max(||x||, 1e-12)."""
    return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True)),
                           NORM_EPS)


class Attention(nn.Module):
    """`attn`: multi-head self-attention with one `qkv` projection and `proj`."""
    dim: int
    num_heads: int
    qkv_bias: bool
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, n, c = x.shape
        h = self.num_heads
        qkv = _dense(3 * c, "qkv", self.precision, self.qkv_bias)(x)
        qkv = qkv.reshape(b, n, 3, h, c // h).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                              # (B, H, N, hd)
        attn = jnp.einsum("bhnd,bhmd->bhnm", q, k, precision=self.precision)
        attn = jax.nn.softmax(attn * (c // h) ** -0.5, axis=-1)
        attn = nn.Dropout(self.attn_drop, deterministic=not train)(attn)
        out = jnp.einsum("bhnm,bhmd->bhnd", attn, v, precision=self.precision)
        out = _dense(c, "proj", self.precision)(out.transpose(0, 2, 1, 3).reshape(b, n, c))
        return nn.Dropout(self.proj_drop, deterministic=not train)(out)


class Mlp(nn.Module):
    """`mlp`: fc1, exact GELU, dropout, fc2, dropout."""
    hidden: int
    out: int
    drop: float = 0.0
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jax.nn.gelu(_dense(self.hidden, "fc1", self.precision)(x), approximate=False)
        x = nn.Dropout(self.drop, deterministic=not train)(x)
        x = _dense(self.out, "fc2", self.precision)(x)
        return nn.Dropout(self.drop, deterministic=not train)(x)


def drop_path(x, rate: float, train: bool, module: nn.Module):
    """Stochastic depth: each sample's branch is zeroed with probability `rate` and the
    survivors scaled by 1 / (1 - rate), as the official `drop_path`."""
    if rate == 0.0 or not train:
        return x
    keep = 1.0 - rate
    u = jax.random.uniform(module.make_rng("dropout"), (x.shape[0],) + (1,) * (x.ndim - 1))
    return x / keep * jnp.floor(keep + u)


class Block(nn.Module):
    """`blocks.{i}`: x + attn(norm1(x)), then x + mlp(norm2(x)) (pre-norm)."""
    dim: int
    num_heads: int
    hidden: int
    qkv_bias: bool
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = Attention(self.dim, self.num_heads, self.qkv_bias, self.attn_drop, self.drop,
                      self.precision, name="attn")(_layer_norm("norm1")(x), train)
        x = x + drop_path(y, self.drop_path, train, self)
        y = Mlp(self.hidden, self.dim, self.drop, self.precision, name="mlp")(
            _layer_norm("norm2")(x), train)
        return x + drop_path(y, self.drop_path, train, self)


class FeatureAlign(nn.Module):
    """`feature_align`: one linear layer (`layers.0`) back to the affinity size, for the
    training loss's feature-alignment term."""
    out: int
    precision: Precision = "highest"

    @nn.compact
    def __call__(self, x):
        return _dense(self.out, "layers_0", self.precision)(x)


class RerankTransformer(nn.Module):
    """The official `RerankTransformer`. Input: affinity features (B, 1 + k, anchor_len),
    token 0 the query."""
    arch: CSAArch = CSAArch()
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    precision: Precision = "highest"

    def setup(self):
        a, p = self.arch, self.precision
        self.topk_proj = _dense(a.embed_dim, "topk_proj", p)
        self.feature_align = FeatureAlign(a.anchor_len, p)
        dpr = np.linspace(0.0, self.drop_path_rate, a.depth)
        self.blocks = [Block(a.embed_dim, a.num_heads, a.hidden_dim, a.qkv_bias,
                             self.drop_rate, self.attn_drop_rate, float(dpr[i]), p)
                       for i in range(a.depth)]
        self.sim_drop = nn.Dropout(self.drop_rate)
        self.pos_drop = nn.Dropout(self.drop_rate)

    def encode(self, x, train: bool = False, return_all: bool = False):
        """Output tokens (B, N, embed_dim); with return_all, also the embedding and every
        block's output."""
        x = self.topk_proj(self.sim_drop(x, deterministic=not train))
        x = self.pos_drop(x, deterministic=not train)
        outs = [x]
        for blk in self.blocks:
            x = blk(x, train)
            outs.append(x)
        return (x, outs) if return_all else x

    def forward_feature(self, x):
        """Scores (B, k): cosine of each candidate's output token with the query's (token 0),
        in eval mode (the official `forward_feature`)."""
        n = l2_normalize(self.encode(x))
        return jnp.sum(n[:, :1] * n[:, 1:], axis=-1)

    def __call__(self, x, train: bool = False):
        """The official training `forward`: (exp_sim (B, N) = exp(cos(token 0, token i) / 2)
        for every token, the query's own included; the feature-alignment loss: mean over
        tokens of ||normalize(x) - normalize(feature_align(out))||, clamped to [1e-2, 1e2])."""
        out = self.encode(x, train)
        n = l2_normalize(out)
        exp_sim = jnp.exp(jnp.sum(n[:, :1] * n, axis=-1) / TEMPERATURE)
        aligned = self.feature_align(out)
        d2 = jnp.sum(jnp.square(l2_normalize(x) - l2_normalize(aligned)), axis=-1)
        return exp_sim, jnp.mean(jnp.sqrt(jnp.clip(d2, 1e-4, 1e4)))


def losses(exp_sim, mse, targets, alpha: float):
    """The official train.py loss: (total, contrastive, mse) with contrastive =
    mean(-log(sum(exp_sim * targets) / sum(exp_sim))) and total = contrastive + alpha * mse.
    targets (B, N): 1 where token i shares the query's class (token 0 always does)."""
    pos = jnp.sum(exp_sim * targets, axis=-1)
    contrastive = jnp.mean(-jnp.log(pos / jnp.sum(exp_sim, axis=-1)))
    return contrastive + alpha * mse, contrastive, mse


def abstract_variables(arch: CSAArch) -> dict:
    """{'params': ...} shapes of a CSA model, without computing anything."""
    x = jax.ShapeDtypeStruct((1, 2, arch.anchor_len), jnp.float32)
    return jax.eval_shape(lambda a: RerankTransformer(arch).init(jax.random.PRNGKey(0), a), x)


def init(arch: CSAArch, seed: int = 0) -> dict:
    """Fresh variables: the official initialisation (normal, std 0.02, for every linear
    weight; zero biases; LayerNorm scale 1, bias 0)."""
    x = jnp.zeros((1, 2, arch.anchor_len), jnp.float32)
    return RerankTransformer(arch).init(jax.random.PRNGKey(seed), x)
