"""CSA re-ranking (Contextual Similarity Aggregation, NeurIPS 2021; github MCC-WH/CSA).

    csa = sj.rerank.csa.load("checkpoint-epoch100.pth")   # official file, or our model dir
    A = sj.rerank.csa.affinity(X, Q, ranks, topk=1024, anchor_len=512)
    s = csa.scores(A)                      # (nq, topk): the official forward_feature
    ranks = csa.rerank(X, Q, ranks, topk=1024)

As the official `test.py`: a query's affinity features are the similarities of
[query, top-k database items] (rows) to [query, top anchor_len - 1 database items]
(columns), both lists taken from the first-stage ranking (the anchors whatever topk is);
the transformer scores each candidate, and the top-k is re-ordered by that score alone
(it replaces the first-stage similarity); the rest of the ranking is unchanged.

Options of models we train (`configs/csa_demo.py`; none in official checkpoints, whose
features stay exactly the official ones): `center`, descriptors minus the training bank's
mean and L2-normalised before the affinities (the first-stage ranking is not touched), and
`affinity_norm` "row", each token's affinity row standardised; the model directory records
both (and the training topk, the rerankers' default topk for it), and `rerank` applies them.

Where the database has fewer than anchor_len - 1 items the missing anchor columns are
zeros (the official code cannot run there), and topk is clipped to the database size.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from scvnet_jax.errors import CheckpointError, ConfigError, InputError


def _arch_type():
    from scvnet_jax.models.csa import CSAArch
    return CSAArch


@partial(jax.jit, static_argnames=())
def _affinity(Q, rows, cols):
    r = jnp.concatenate([Q[:, None], rows], axis=1)               # (nq, 1 + k, D)
    c = jnp.concatenate([Q[:, None], cols], axis=1)               # (nq, A, D)
    return jnp.einsum("qnd,qad->qna", r, c, precision="highest")


def affinity(X, Q, ranks, topk: int = 1024, anchor_len: int = 512) -> np.ndarray:
    """Affinity features (nq, min(topk, N) + 1, anchor_len) float32: rows [query, its
    top-k], columns [query, its top anchor_len - 1] (zero columns past the database)."""
    X, Q = np.asarray(X, np.float32), np.asarray(Q, np.float32)
    ranks = np.asarray(ranks)
    _check_ranks(X, Q, ranks)
    for name, v in (("topk", topk), ("anchor_len", anchor_len)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"csa: {name} must be an integer >= 1, got {v!r}")
    k = min(int(topk), ranks.shape[0])
    na = min(int(anchor_len) - 1, ranks.shape[0])
    A = np.asarray(_affinity(jnp.asarray(Q), jnp.asarray(X[ranks[:k].T]),
                             jnp.asarray(X[ranks[:na].T])))
    if A.shape[2] < anchor_len:
        A = np.concatenate([A, np.zeros(A.shape[:2] + (anchor_len - A.shape[2],),
                                        np.float32)], axis=2)
    return A


AFFINITY_NORMS = ("none", "row")


def center_descriptors(X, mean) -> np.ndarray:
    """(X - mean) L2-normalised (rows), float32; X itself when mean is None."""
    X = np.asarray(X, np.float32)
    if mean is None:
        return X
    Y = X - np.asarray(mean, np.float32)
    return Y / np.maximum(np.linalg.norm(Y, axis=-1, keepdims=True), 1e-12)


def normalize_affinity(A, mode: str = "none") -> np.ndarray:
    """Affinity features (..., tokens, anchors) as a model trained with `affinity_norm`
    = mode saw them: "none" unchanged, "row" each token's row standardised."""
    if mode not in AFFINITY_NORMS:
        raise ConfigError(f"csa: affinity_norm must be one of {AFFINITY_NORMS}, got {mode!r}")
    A = np.asarray(A, np.float32)
    if mode == "none":
        return A
    return (A - A.mean(-1, keepdims=True)) / (A.std(-1, keepdims=True) + 1e-6)


def _check_ranks(X, Q, ranks):
    if X.ndim != 2 or Q.ndim != 2 or X.shape[1] != Q.shape[1]:
        raise InputError(f"X must be (N, D) and Q (nq, D) with the same D; got {X.shape} and "
                         f"{Q.shape}")
    if ranks.ndim != 2 or ranks.shape[1] != Q.shape[0] or not 0 < ranks.shape[0] <= X.shape[0]:
        raise InputError(f"ranks must be (n, nq) database indices, n <= N = {X.shape[0]} and "
                         f"nq = {Q.shape[0]}; got {ranks.shape}")


@partial(jax.jit, static_argnames=("module", "method"))
def _apply(module, method, variables, A):
    if method == "activations":
        return module.apply(variables, A, return_all=True, method="encode")[1]
    return module.apply(variables, A, method=method)


DTYPES = ("float32", "float64")


class CSAReranker:
    """A CSA model with its weights (`arch`: a CSAArch; `variables`: {'params': ...}).

    dtype: "float32" (default: the official precision; scores agree with the official
    float64 reference to 2e-6 and rankings are identical) or "float64", which reproduces
    the float64 reference's activations too (float32 runs, the official one included,
    differ from it by up to ~2e-5 in the transformer blocks' outputs, whose values reach
    ~30) at several times the cost; on accelerators without float64 use float32."""

    def __init__(self, arch, variables, source: str | None = None, dtype: str = "float32",
                 *, center=None, affinity_norm: str = "none", topk: int | None = None):
        from scvnet_jax.models.csa import RerankTransformer
        if dtype not in DTYPES:
            raise ConfigError(f"csa: dtype must be one of {DTYPES}, got {dtype!r}")
        if affinity_norm not in AFFINITY_NORMS:
            raise ConfigError(f"csa: affinity_norm must be one of {AFFINITY_NORMS}, got "
                              f"{affinity_norm!r}")
        self.center = None if center is None else np.asarray(center, np.float32)
        self.affinity_norm = affinity_norm
        self.topk = None if topk is None else int(topk)     # the training topk, if known
        self.arch = arch
        self.module = RerankTransformer(arch)
        self.variables = jax.tree.map(np.asarray, dict(variables))
        self.source = source
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"CSAReranker({self.arch}, dtype={self.dtype}, source={self.source!r})"

    def _run(self, method: str, A, batch_size: int):
        A = np.asarray(A, np.float32)
        if A.ndim != 3 or A.shape[2] != self.arch.anchor_len or A.shape[1] < 2:
            raise InputError(f"affinity features must be (nq, 1 + k, anchor_len = "
                             f"{self.arch.anchor_len}) with k >= 1, got {A.shape}")
        n = A.shape[0]
        b = min(int(batch_size), n)
        wide = self.dtype == "float64"
        with jax.enable_x64(wide):
            dt = np.float64 if wide else np.float32
            variables = jax.tree.map(lambda a: jnp.asarray(a, dt), self.variables)
            out = []
            for s in range(0, n, b):
                chunk = A[s:s + b].astype(dt)
                if len(chunk) < b:                   # one compiled shape for every batch
                    chunk = np.concatenate([chunk, np.zeros((b - len(chunk),) + A.shape[1:],
                                                            dt)])
                res = _apply(self.module, method, variables, chunk)
                out.append(jax.tree.map(lambda r: np.asarray(r)[:n - s], res))
        return jax.tree.map(lambda *parts: np.concatenate(parts), *out)

    def scores(self, A, batch_size: int = 64) -> np.ndarray:
        """The official `forward_feature` scores (nq, k) of affinity features (nq, 1 + k,
        anchor_len), in query batches of one compiled shape."""
        return self._run("forward_feature", A, batch_size)

    def activations(self, A, batch_size: int = 64) -> list:
        """[embedding, block 0 output, block 1 output, ...], each (nq, 1 + k, embed_dim)."""
        return self._run("activations", A, batch_size)

    def features(self, X, Q, ranks, topk: int = 1024) -> np.ndarray:
        """The affinity features this model scores: `affinity` of the (centred, if the model
        was trained so) descriptors, normalised as in training."""
        if self.center is not None:
            X, Q = center_descriptors(X, self.center), center_descriptors(Q, self.center)
        return normalize_affinity(affinity(X, Q, ranks, topk, self.arch.anchor_len),
                                  self.affinity_norm)

    def rerank(self, X, Q, ranks, topk: int = 1024, return_scores: bool = False):
        """The top-k of `ranks` (N, nq) re-ordered by CSA score, the rest unchanged ->
        (N, nq) int64 (with return_scores also the (min(topk, N), nq) scores, sorted)."""
        ranks = np.asarray(ranks)
        A = self.features(X, Q, ranks, topk)
        s = self.scores(A)                                          # (nq, k)
        order = np.argsort(-s, axis=1, kind="stable")
        k = s.shape[1]
        out = ranks.astype(np.int64).copy()
        out[:k] = np.take_along_axis(ranks[:k].T, order, axis=1).T
        if return_scores:
            return out, np.take_along_axis(s, order, axis=1).T
        return out

    def save(self, out_dir, *, meta: Mapping | None = None, overwrite: bool = False) -> Path:
        """A model directory (config.json with kind "csa" + an orbax checkpoint)."""
        from scvnet_jax.convert.model_dir import save_model_dir
        return save_model_dir(out_dir, self.arch, self.variables, meta=meta,
                              overwrite=overwrite)

    def state_dict(self) -> dict:
        """The official state dict (NumPy, PyTorch layouts and names)."""
        from scvnet_jax.convert.mapping import variables_to_state_dict
        return variables_to_state_dict(self.variables)


CSA = CSAReranker     # its former name (the Flax module: models.csa.RerankTransformer)


def from_state_dict(state_dict: Mapping, embed_dim: int = 768, depth: int = 2,
                    num_heads: int = 12, mlp_ratio: float = 4, qkv_bias: bool = True,
                    anchor_len: int = 512, source: str = "state dict",
                    dtype: str = "float32") -> CSAReranker:
    """A CSA from an official state dict ({name: NumPy array}, PyTorch layouts), checked
    key by key and shape by shape against the architecture (one grouped error)."""
    from scvnet_jax.convert.checkpoints import variables_from_state_dict
    from scvnet_jax.models.csa import abstract_variables
    arch, variables = variables_from_state_dict(
        lambda: _arch_type()(anchor_len=anchor_len, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias),
        state_dict, source, abstract_variables)
    return CSAReranker(arch, variables, source, dtype)


def infer_arch(sd: Mapping, source: str, num_heads: int | None = None):
    """A CSAArch read off an official state dict (num_heads is not in it: 12, the official
    scripts' value, unless given)."""
    try:
        e, a = sd["topk_proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as err:
        from scvnet_jax.convert.checkpoints import not_a_state_dict
        raise not_a_state_dict(source, "CSA", err, sd) from None
    heads = 12 if num_heads is None else int(num_heads)
    if num_heads is None and e % heads:
        raise CheckpointError(f"{source}: embed_dim {e} is not a multiple of 12 (the official "
                              "scripts' head count); pass num_heads=")
    ratio = hidden / e
    return dict(embed_dim=int(e), depth=depth, num_heads=heads,
                mlp_ratio=int(ratio) if float(ratio).is_integer() else ratio,
                qkv_bias="blocks.0.attn.qkv.bias" in sd, anchor_len=int(a))


def load(path, num_heads: int | None = None, dtype: str = "float32") -> CSAReranker:
    """A CSA from an official checkpoint (`torch.save({'epoch', 'state_dict'})`, read
    without torch through the restricted unpickler) or a model directory we wrote.
    num_heads: for official files, which do not record it (default 12). dtype: see CSAReranker."""
    from scvnet_jax.convert import checkpoints
    from scvnet_jax.convert.model_dir import is_model_dir

    if is_model_dir(path):
        arch, variables, meta = checkpoints.read_model_dir(path, "csa")
        if num_heads is not None and int(num_heads) != arch.num_heads:
            raise CheckpointError(f"{path}: holds a CSA with {arch.num_heads} heads, not "
                                  f"{num_heads}")
        pre = meta.get("preprocess") or {}
        center = pre.get("center")
        if center is not None and np.shape(center) != (len(center),):
            raise CheckpointError(f"{path}: meta.preprocess.center must be a vector")
        topk = meta.get("topk")
        return CSAReranker(arch, variables, str(path), dtype, center=center,
                   affinity_norm=pre.get("affinity_norm", "none"),
                   topk=int(topk) if isinstance(topk, int) and topk >= 1 else None)
    sd, source = checkpoints.official_state_dict(path, "CSA", "state_dict",
                                                 "{'epoch', 'state_dict'}")
    return from_state_dict(sd, **infer_arch(sd, source, num_heads), source=source,
                           dtype=dtype)
