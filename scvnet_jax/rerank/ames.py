"""AMES re-ranking (Asymmetric and Memory-Efficient Similarity, ECCV 2024; github
pavelsuma/ames): a transformer scores each (query, shortlisted database image) pair from
their local descriptors.

    ames = sj.rerank.ames.load("ames_cvnet_fp.pt")      # official file, or our model dir
    logits = ames.similarity(q_local, q_mask, db_local, db_mask)        # (B,) pairs
    tokens = ames.db_tokens(db_local, db_mask)     # what a store keeps per database image
    logits = ames.similarity_from_tokens(q_local, q_mask, tokens, db_mask)
    ranks, scores = sj.rerank.ames.rerank(ames, q_local, q_mask, db_local, db_mask,
                                          ranks, sims, k=100, lamb=0.85, temp=0.8)

Local descriptors: (n, L, local_dim) per image with a mask (n, L), True = padding, as the
official loader cuts them from its hdf5 `features` arrays (`split_features`).

Re-ranking is the official `src/utils/metrics.py: rerank`: the shortlist is the first
stage's top K (`ranks`, `sims`, (K, nq), best first); with protocol "official" each query's
junk (setting "medium"), resp. junk + easy ("hard") images are moved to the end of its
shortlist, order kept (the authors' evaluation; it needs the ground truth), "blind" uses no
labels. The first k of the shortlist are scored and sorted by
    s = lamb * first-stage similarity + (1 - lamb) * sigmoid(temp * logit)
(float32, as the official code), the rest of the shortlist unchanged. The official mAP is
computed on the shortlist alone, AP normalised by min(#positives, K) (`shortlist_map`).

Database tokens (`db_tokens`): fp models keep float16 tokens (the official eval-time
rounding makes them exact, not an approximation); dist models the codes in {-1, 0, 1},
stored in one bit each by `pack_codes` (see there for the zero code).
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scvnet_jax.errors import CheckpointError, ConfigError, InputError

DTYPES = ("float32", "float64")
DB_FORMATS = ("local", "tokens", "packed")
PROTOCOLS = ("official", "blind")
SETTINGS = ("medium", "hard")
DESCRIPTOR_COLUMN, MASK_COLUMN = 5, 3       # hdf5 `features`: x, y, scale, mask, weight, desc


def _arch_type():
    from scvnet_jax.models.ames import AMESArch
    return AMESArch


@partial(jax.jit, static_argnames=("module", "method", "options"))
def _apply(module, method, options, variables, *args):
    return module.apply(variables, *args, method=method, **dict(options))


def _pairs_fn(module, variables, src, src_mask, db, db_mask, db_format):
    if db_format == "local":
        db = module.apply(variables, db, method="encode_db")
    return module.apply(variables, src, src_mask, db, db_mask, method="from_tokens")


_pairs = jax.jit(_pairs_fn, static_argnames=("module", "db_format"))


def split_features(features, sequence_len: int | None = None):
    """(descriptors (n, L, D) float32, mask (n, L) bool) of an official hdf5 `features` array
    (n, stored length, 5 + D: x, y, scale, mask, weight, descriptor), cut to the first
    sequence_len tokens as the official loader does (`query_sequence_len` for queries,
    `sequence_len` for the database). A NumPy memmap stays one: descriptors are a view."""
    if np.ndim(features) != 3 or features.shape[2] <= DESCRIPTOR_COLUMN:
        raise InputError(f"features must be (n, L, 5 + D) [x, y, scale, mask, weight, "
                         f"descriptor], got shape {np.shape(features)}")
    cut = slice(None, None if sequence_len is None else int(sequence_len))
    local = features[:, cut, DESCRIPTOR_COLUMN:]
    mask = np.asarray(features[:, cut, MASK_COLUMN]) != 0
    return local, mask


def pack_codes(codes) -> np.ndarray:
    """dist codes (..., bits) in {-1, 0, 1} -> (..., ceil(bits / 8)) uint8, one bit per code
    (np.packbits, big-endian bit order: bit 1 = +1, 0 = -1).

    A 0 code (an exactly zero projection) cannot be kept in one bit and is stored as +1.
    Zero codes come in whole tokens from zero descriptors, which is what the official hdf5
    files hold in padded slots (`db_tokens` also zeroes every padded token); `unpack_codes`
    restores them from the mask, and padded tokens never reach the logit anyway. A zero
    inside a real token needs a projection exactly 0: measure zero for real descriptors
    (none in the reference fixtures); it would read back as +1."""
    codes = np.asarray(codes)
    return np.packbits(codes >= 0, axis=-1)


def unpack_codes(packed, bits: int, mask=None) -> np.ndarray:
    """Inverse of `pack_codes`: int8 codes (..., bits) in {-1, 1}, and 0 for the whole tokens
    where `mask` (..., L) (True = padding) is set, as `db_tokens` returns them."""
    b = np.unpackbits(np.asarray(packed, np.uint8), axis=-1, count=int(bits))
    codes = (2 * b.astype(np.int8) - 1).astype(np.int8)
    if mask is not None:
        codes[np.asarray(mask, bool)] = 0
    return codes


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    if len(a) == n:
        return a
    return np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)])


class AMES:
    """An AMES model with its weights (`arch`: an AMESArch; `variables`: {'params': ...}).

    dtype: "float32" (default: the official precision; the logits agree with the official
    float64 reference within the README's tolerances, rankings identical) or "float64"
    (reproduces the float64 reference's activations too; several times slower; not on
    accelerators without float64). Every call runs in batches of one compiled shape."""

    def __init__(self, arch, variables, source: str | None = None, dtype: str = "float32"):
        from scvnet_jax.models.ames import AMES as Module
        if dtype not in DTYPES:
            raise ConfigError(f"ames: dtype must be one of {DTYPES}, got {dtype!r}")
        self.arch = arch
        self.module = Module(arch)
        self.variables = jax.tree.map(np.asarray, dict(variables))
        self.source = source
        self.dtype = dtype
        self.meta: dict = {}        # a model directory's meta (how it was trained, defaults)

    def __repr__(self) -> str:
        return f"AMES({self.arch}, dtype={self.dtype}, source={self.source!r})"

    # -- plumbing --------------------------------------------------------------------------

    @property
    def _np_dtype(self):
        return np.float64 if self.dtype == "float64" else np.float32

    def _vars(self):
        return jax.tree.map(lambda a: jnp.asarray(a, self._np_dtype), self.variables)

    def _check(self, local, mask, what: str, dim: int | None = None):
        dim = self.arch.local_dim if dim is None else dim
        if np.ndim(local) != 3 or local.shape[2] != dim:
            raise InputError(f"ames: {what} must be (n, L, {dim}), got {np.shape(local)}")
        mask = np.zeros(local.shape[:2], bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != local.shape[:2]:
            raise InputError(f"ames: the mask of {what} must be {local.shape[:2]}, got "
                             f"{mask.shape}")
        return mask

    def _batched(self, method: str, arrays: Sequence[np.ndarray], batch_size: int,
                 options: tuple = ()):
        """`method` over the rows of `arrays` (same length n) in batches of one shape."""
        n = len(arrays[0])
        if n == 0:
            raise InputError("ames: no pairs given")
        b = max(1, min(int(batch_size), n))
        with jax.enable_x64(self.dtype == "float64"):
            variables = self._vars()
            out = []
            for s in range(0, n, b):
                chunk = [_pad_rows(np.asarray(a[s:s + b]), b) for a in arrays]
                res = _apply(self.module, method, options, variables, *chunk)
                out.append(jax.tree.map(lambda r: np.asarray(r)[:n - s], res))
        return jax.tree.map(lambda *parts: np.concatenate(parts), *out)

    def _local(self, x):
        return np.asarray(x, self._np_dtype)

    # -- the model -------------------------------------------------------------------------

    def similarity(self, q_local, q_mask, db_local, db_mask, *, train: bool = False,
                   batch_size: int = 64) -> np.ndarray:
        """The official forward: logits (B,) of pairs (q_local[b], db_local[b]), descriptors
        (B, Q, local_dim) and (B, T, local_dim), masks (B, Q), (B, T) True = padding.
        Eval mode (database tokens rounded to float16; dist: sign codes); train=True: the
        training-mode forward (no rounding; dist: the erf surrogate)."""
        q_mask = self._check(q_local, q_mask, "q_local")
        db_mask = self._check(db_local, db_mask, "db_local")
        if len(q_local) != len(db_local):
            raise InputError(f"ames: {len(q_local)} queries and {len(db_local)} database "
                             "images: similarity scores pairs, one of each")
        if not train:
            return self.similarity_from_tokens(
                q_local, q_mask, self.db_tokens(db_local, db_mask, batch_size=batch_size),
                db_mask, batch_size=batch_size)
        return self._batched("__call__", [self._local(q_local), q_mask,
                                          self._local(db_local), db_mask], batch_size,
                             (("train", True),))

    def db_tokens(self, db_local, db_mask=None, *, batch_size: int = 64) -> np.ndarray:
        """What the decoder consumes of database images (n, T, local_dim), eval mode: fp
        models the projected tokens rounded to float16 ((n, T, model_dim) float16, exactly
        the official `.half()`), dist models the codes ((n, T, model_dim) int8 in {-1, 0, 1};
        `pack_codes` stores them in bits). Padded tokens (db_mask True) are zeroed: their
        values never reach a logit (padded keys get exactly zero attention weight)."""
        db_mask = self._check(db_local, db_mask, "db_local")
        t = self._batched("encode_db", [self._local(db_local)], batch_size)
        t = t.astype(np.int8 if self.arch.binarized else np.float16)
        t[db_mask] = 0
        return t

    def similarity_from_tokens(self, q_local, q_mask, db_tokens, db_mask, *,
                               batch_size: int = 64) -> np.ndarray:
        """Eval-mode logits (B,) of pairs of query descriptors and `db_tokens` (fp float16
        tokens, or dist codes)."""
        q_mask = self._check(q_local, q_mask, "q_local")
        db_mask = self._check(db_tokens, db_mask, "db_tokens", self.arch.model_dim)
        if len(q_local) != len(db_tokens):
            raise InputError(f"ames: {len(q_local)} queries and {len(db_tokens)} database "
                             "images: similarity scores pairs, one of each")
        db = np.asarray(db_tokens, np.int8 if self.arch.binarized else np.float16)
        return self._batched("from_db", [self._local(q_local), q_mask, db, db_mask],
                             batch_size)

    def activations(self, q_local, q_mask, db_local, db_mask, *,
                    train: bool = False) -> dict:
        """The forward's intermediates, one batch: {"sim" (B,), "src_remap", "tgt_remap"
        (tokens after remap_local), "tgt_remap_f16" (what the decoder gets: rounded in eval
        mode, fp), "layers" [(B, 1 + Q + T, model_dim) per decoder layer], "tokens_out"
        (final tokens: matching token, query, database), dist: "src_binary", "tgt_binary"}."""
        q_mask = self._check(q_local, q_mask, "q_local")
        db_mask = self._check(db_local, db_mask, "db_local")
        sim, extra = self._batched(
            "__call__", [self._local(q_local), q_mask, self._local(db_local), db_mask],
            len(q_local), (("train", bool(train)), ("return_all", True)))
        return {"sim": sim, **extra}

    def query_tokens(self, q_local, *, batch_size: int = 64) -> np.ndarray:
        """The query side's tokens (n, Q, model_dim), in the model's dtype (not rounded)."""
        self._check(q_local, None, "q_local")
        return self._batched("remap", [self._local(q_local)], batch_size)

    def shortlist_logits(self, q_local, q_mask, db, db_mask, ranks, *,
                         db_format: str = "local", batch_size: int = 64) -> np.ndarray:
        """Logits (n, nq) float32 of every query with its shortlisted database images
        `ranks` (n, nq), best first (the official `raw_sim`, transposed).

        q_local (nq, Q, local_dim), q_mask (nq, Q); db (N, T, ...) with db_mask (N, T):
        db_format "local" descriptors (N, T, local_dim), "tokens" `db_tokens`' output
        (N, T, model_dim), or "packed" (dist: `pack_codes` of them). Database items are read
        by index, batch by batch, so db may be a large np.memmap. Pairs are scored
        batch_size at a time in one compiled shape."""
        if db_format not in DB_FORMATS:
            raise ConfigError(f"ames: db_format must be one of {DB_FORMATS}, got {db_format!r}")
        if db_format == "packed" and not self.arch.binarized:
            raise ConfigError("ames: packed database codes need a binarized (dist) model")
        q_mask = self._check(q_local, q_mask, "q_local")
        dim = {"local": self.arch.local_dim, "tokens": self.arch.model_dim,
               "packed": -(-self.arch.model_dim // 8)}[db_format]
        db_mask = self._check(db, db_mask, f"db ({db_format})", dim)
        ranks = np.asarray(ranks)
        nq = len(q_local)
        if ranks.ndim != 2 or ranks.shape[1] != nq or ranks.shape[0] < 1:
            raise InputError(f"ames: ranks must be (n, nq = {nq}) database indices, got "
                             f"{ranks.shape}")
        if ranks.min() < 0 or ranks.max() >= len(db):
            raise InputError(f"ames: ranks hold indices outside the database of {len(db)}")
        n = ranks.shape[0]
        qi = np.repeat(np.arange(nq), n)                    # pair p = (query, its j-th)
        di = ranks.T.reshape(-1).astype(np.int64)
        b = max(1, min(int(batch_size), len(qi)))
        fmt = "local" if db_format == "local" else "tokens"
        out = np.empty(len(qi), np.float32)
        with jax.enable_x64(self.dtype == "float64"):
            variables = self._vars()
            src_all = np.asarray(_apply(self.module, "remap", (), variables,
                                        self._local(q_local)))
            for s in range(0, len(qi), b):
                q, d = _pad_rows(qi[s:s + b], b), _pad_rows(di[s:s + b], b)
                u, inv = np.unique(d, return_inverse=True)        # sorted reads of db
                rows = np.asarray(db[u])[inv]
                if db_format == "local":
                    rows = self._local(rows)
                elif db_format == "packed":
                    rows = unpack_codes(rows, self.arch.model_dim)
                else:
                    rows = rows.astype(np.int8 if self.arch.binarized else np.float16)
                m = np.asarray(db_mask[u], bool)[inv]
                logits = _pairs(self.module, variables, src_all[q], q_mask[q], rows, m, fmt)
                out[s:s + b] = np.asarray(logits)[:min(b, len(qi) - s)]
        return out.reshape(nq, n).T.copy()

    # -- files -----------------------------------------------------------------------------

    def save(self, out_dir, *, meta: Mapping | None = None, overwrite: bool = False) -> Path:
        """A model directory (config.json with kind "ames" + an orbax checkpoint)."""
        from scvnet_jax.convert.model_dir import save_model_dir
        return save_model_dir(out_dir, self.arch, self.variables, meta=meta,
                              overwrite=overwrite)

    def state_dict(self) -> dict:
        """The official state dict (NumPy, PyTorch layouts and names)."""
        from scvnet_jax.convert.mapping import variables_to_state_dict
        return variables_to_state_dict(self.variables)


# -- the re-ranking -------------------------------------------------------------------------

def _check_shortlist(ranks, sims):
    ranks, sims = np.asarray(ranks), np.asarray(sims, np.float32)
    if ranks.ndim != 2 or ranks.shape != sims.shape or ranks.shape[0] < 1:
        raise InputError(f"ames: ranks and sims must both be (K, nq), best first; got "
                         f"{ranks.shape} and {sims.shape}")
    return ranks.astype(np.int64), sims


def shortlist(ranks, sims, *, protocol: str = "official", gnd=None,
              setting: str = "medium"):
    """The shortlist the official code re-ranks: (ranks, sims) (K, nq) of the first stage;
    protocol "official" moves each query's junk (setting "medium"), resp. junk and easy
    ("hard") images to the end of its shortlist, order kept (the official code does so
    when the ground truth has 'junk'), "blind" returns them as they are."""
    ranks, sims = _check_shortlist(ranks, sims)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"ames: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if setting not in SETTINGS:
        raise ConfigError(f"ames: setting must be one of {SETTINGS}, got {setting!r}")
    if protocol == "blind":
        return ranks, sims
    if gnd is None:
        raise ConfigError("ames: protocol 'official' needs the ground truth (gnd); use "
                          "'blind' on data without labels")
    if isinstance(gnd, Mapping):
        gnd = gnd["gnd"]
    if len(gnd) != ranks.shape[1]:
        raise InputError(f"ames: {len(gnd)} ground-truth entries for {ranks.shape[1]} queries")
    if not len(gnd) or "junk" not in gnd[0]:
        return ranks, sims
    ranks, sims = ranks.copy(), sims.copy()
    for i, g in enumerate(gnd):
        moved = list(g.get("junk", ())) + (list(g.get("easy", ())) if setting == "hard" else [])
        is_junk = np.isin(ranks[:, i], np.asarray(moved, np.int64))
        order = np.concatenate([np.flatnonzero(~is_junk), np.flatnonzero(is_junk)])
        ranks[:, i], sims[:, i] = ranks[order, i], sims[order, i]
    return ranks, sims


def combine(ranks, sims, logits, *, k: int = 100, lamb: float = 0.5, temp: float = 0.5):
    """The official scoring of a shortlist (ranks, sims (K, nq)) with the model's logits
    (>= min(k, K), nq) of its first rows: s = lamb * sims + (1 - lamb) * sigmoid(temp *
    logit) over the first k, in float32 as the official code; they are sorted by s
    (descending), the rest unchanged -> (ranks (K, nq) int64, s sorted (min(k, K), nq))."""
    ranks, sims = _check_shortlist(ranks, sims)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"ames: k must be an integer >= 1, got {k!r}")
    k = min(int(k), ranks.shape[0])
    raw = np.asarray(logits, np.float32)
    if raw.ndim != 2 or raw.shape[1] != ranks.shape[1] or raw.shape[0] < k:
        raise InputError(f"ames: logits must be (>= {k}, {ranks.shape[1]}), got {raw.shape}")
    with np.errstate(over="ignore"):
        s = np.float32(1.0) / (np.float32(1.0) + np.exp(np.float32(-temp) * raw[:k]))
    s = np.float32(lamb) * sims[:k] + np.float32(1 - lamb) * s
    order = np.argsort(-s, axis=0, kind="stable")
    out = ranks.copy()
    out[:k] = np.take_along_axis(ranks[:k], order, axis=0)
    return out, np.take_along_axis(s, order, axis=0)


def rerank(model: AMES, q_local, q_mask, db, db_mask, ranks, sims, *, k: int = 100,
           lamb: float = 0.5, temp: float = 0.5, protocol: str = "official", gnd=None,
           setting: str = "medium", db_format: str = "local", batch_size: int = 64,
           return_logits: bool = False):
    """The official AMES re-ranking (`src/utils/metrics.py: rerank`) of one (k, lamb, temp).

    Args:
      model: an AMES (`load`, `from_state_dict`).
      q_local, q_mask: the queries' descriptors (nq, Q, local_dim) and mask (True = padding).
      db, db_mask: the database (N, T, ...) in `db_format` ("local" descriptors, "tokens"
        from `db_tokens`, "packed" dist codes), read by index (np.memmap is fine).
      ranks, sims: the first stage's shortlist (K, nq), best first, and its similarities.
      k, lamb, temp: how many are re-ranked; the official defaults are 100 / 0.5 / 0.5 (the
        authors' best for CVNet descriptors: fp 0.85 / 0.8, dist 0.65 / 0.2).
      protocol, gnd, setting: see `shortlist`.
    Returns:
      (ranks (K, nq) int64, scores (min(k, K), nq) float32, descending): the re-ranked
      shortlist and what its first rows are sorted by; with return_logits also the logits
      (min(k, K), nq) in the (protocol's) shortlist order, to try other lamb / temp with
      `combine` without running the model again.
    """
    ranks, sims = shortlist(ranks, sims, protocol=protocol, gnd=gnd, setting=setting)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"ames: k must be an integer >= 1, got {k!r}")
    kk = min(int(k), ranks.shape[0])
    logits = model.shortlist_logits(q_local, q_mask, db, db_mask, ranks[:kk],
                                    db_format=db_format, batch_size=batch_size)
    out, scores = combine(ranks, sims, logits, k=kk, lamb=lamb, temp=temp)
    return (out, scores, logits) if return_logits else (out, scores)


def shortlist_map(ranks, gnd) -> tuple[float, float, float]:
    """The official E, M, H mAP (fractions) of re-ranked shortlists (K, nq): revisitop's
    protocol on the shortlist alone, AP normalised by min(#positives, K) (the official
    `compute_map` on the (K, nq) ranks it gets)."""
    from scvnet_jax import metrics
    if isinstance(gnd, Mapping):
        gnd = gnd["gnd"]
    ranks = np.asarray(ranks)
    return tuple(metrics.compute_map(ranks, metrics.setting_gnd(gnd, s), (),
                                     nres_cap=ranks.shape[0])[0] for s in metrics.SETTINGS)


# -- loading --------------------------------------------------------------------------------

def from_state_dict(state_dict: Mapping, local_dim: int = 1024, model_dim: int = 128,
                    nhead: int = 2, num_encoder_layers: int = 5, dim_feedforward: int = 1024,
                    binarized: bool = False, *, activation: str = "relu",
                    normalize_before: bool = False, source: str = "state dict",
                    dtype: str = "float32") -> AMES:
    """An AMES from an official state dict ({name: NumPy array}, PyTorch layouts; the
    official `AMES(...)` arguments, defaults conf/model/ames.yaml with 1024-d descriptors),
    checked key by key and shape by shape against the architecture (one grouped error)."""
    from scvnet_jax.convert import mapping
    from scvnet_jax.models.ames import abstract_variables
    try:
        arch = _arch_type()(local_dim=local_dim, model_dim=model_dim, nhead=nhead,
                            num_encoder_layers=num_encoder_layers,
                            dim_feedforward=dim_feedforward, binarized=binarized,
                            activation=activation, normalize_before=normalize_before)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    expected = mapping.expected_state_dict_shapes(abstract_variables(arch))
    mapping.check_shapes({k: tuple(v.shape) for k, v in sd.items()}, expected, source, arch)
    return AMES(arch, mapping.state_dict_to_variables(sd), source, dtype)


def infer_arch(sd: Mapping, source: str, nhead: int | None = None) -> dict:
    """from_state_dict's arguments read off an official state dict: binarized (has
    remap_local.0.W), local_dim, model_dim, layers, dim_feedforward, normalize_before (has
    decoder.norm). nhead is not in it: 2 (conf/model/ames.yaml) unless given."""
    try:
        binarized = "remap_local.0.W" in sd
        if binarized:
            local_dim = sd["remap_local.0.W"].shape[0]
            model_dim = sd["remap_local.1.weight"].shape[0]
        else:
            model_dim, local_dim = sd["remap_local.0.weight"].shape
        layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers."))
        ff = sd["decoder.layers.0.linear1.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(f"{source}: not an AMES state dict (no {err} among "
                              f"{', '.join(list(sd)[:5])}, ...)") from None
    heads = 2 if nhead is None else int(nhead)
    if model_dim % heads:
        raise CheckpointError(f"{source}: model_dim {model_dim} is not a multiple of nhead "
                              f"{heads}" + ("" if nhead else " (the official default); pass "
                                            "nhead="))
    return dict(local_dim=int(local_dim), model_dim=int(model_dim), nhead=heads,
                num_encoder_layers=layers, dim_feedforward=int(ff), binarized=binarized,
                normalize_before="decoder.norm.weight" in sd)


def load(path, nhead: int | None = None, *, activation: str = "relu",
         dtype: str = "float32") -> AMES:
    """An AMES from an official checkpoint (`torch.save({'state': state_dict, ...})`, read
    without torch through the restricted unpickler; the architecture is read off the state
    dict, nhead (not recorded) defaults to 2, the official configuration's) or from a model
    directory we wrote (kind "ames"). dtype: see AMES."""
    from scvnet_jax.convert.model_dir import is_model_dir, load_model_dir, read_config
    from scvnet_jax.convert.torch_file import load_torch_file

    if is_model_dir(path):
        arch, variables = load_model_dir(path, kind="ames")
        if nhead is not None and int(nhead) != arch.nhead:
            raise CheckpointError(f"{path}: holds an AMES with {arch.nhead} heads, not "
                                  f"{nhead}")
        out = AMES(arch, variables, str(path), dtype)
        out.meta = dict(read_config(path, "ames").get("meta") or {})
        return out
    if Path(path).is_dir():
        raise CheckpointError(f"{path}: a directory without config.json; expected an official "
                              "AMES checkpoint or a model directory written by scvnet_jax")
    source = os.fspath(path)
    obj = load_torch_file(source)
    if isinstance(obj, Mapping) and "state" in obj:
        obj = obj["state"]
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise CheckpointError(f"{source}: expected {{'state': state_dict}} or a state dict of "
                              "tensors")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    return from_state_dict(sd, **infer_arch(sd, source, nhead), activation=activation,
                           source=source, dtype=dtype)


# -- on images: local descriptors, the database-token store, the defaults -------------------

# The authors' best (lamb, temp) for CVNet descriptors (README of github pavelsuma/ames),
# by variant; their README command's asymmetric lengths (600 query descriptors, 50 per
# database image: the database side is what is stored) and shortlist.
OFFICIAL_DEFAULTS = {False: {"lamb": 0.85, "temp": 0.8}, True: {"lamb": 0.65, "temp": 0.2}}
OFFICIAL_K, OFFICIAL_QUERY_LEN, OFFICIAL_DB_LEN = 100, 600, 50


def settings_of(model: AMES) -> dict:
    """What `rerank_images` uses unless told otherwise: lamb, temp, k, query_len and db_len
    (local descriptors per query / database image), scales, detector ('' = none), backbone
    ('' = the caller's), from the model directory's meta for models we trained (the upper
    ends of their training ranges), else the authors' settings."""
    from scvnet_jax.engine.local import SCALES
    out = {**OFFICIAL_DEFAULTS[bool(model.arch.binarized)], "k": OFFICIAL_K,
           "query_len": OFFICIAL_QUERY_LEN, "db_len": OFFICIAL_DB_LEN,
           "scales": tuple(SCALES), "detector": None, "backbone": ""}
    meta = getattr(model, "meta", None) or {}
    d, r = meta.get("descriptors") or {}, meta.get("rerank") or {}
    if d:
        out.update(query_len=int(d.get("query_len", out["query_len"])),
                   db_len=int(d.get("db_len", out["db_len"])),
                   scales=tuple(float(s) for s in d.get("scales", out["scales"])),
                   detector=d.get("detector") or "", backbone=str(d.get("model", "")))
    for key in ("lamb", "temp", "k"):
        if key in r:
            out[key] = type(out[key])(r[key])
    return out


class TokenStore:
    """Content-keyed database tokens on disk: per image (by its content digest) what the
    decoder consumes (`AMES.db_tokens`: float16 tokens of an fp model, packed bits of a
    dist model) and its number of real rows; keyed by everything they depend on (backbone,
    detector, AMES weights, topk, scales). One small file per image, written atomically:
    a killed run keeps every finished image."""

    def __init__(self, cache_dir, key: Mapping, kind: str = "ames-tokens"):
        from scvnet_jax.engine.cache import ChunkCache
        # the engine's cache gives the folder: named by a hash of the key, key.json inside
        self.dir = ChunkCache(cache_dir, kind, dict(key), 1).dir

    def _path(self, digest: str) -> Path:
        return self.dir / f"{digest}.npz"

    def get(self, digest: str):
        try:
            with np.load(self._path(digest), allow_pickle=False) as z:
                return z["tokens"], int(z["length"])
        except (OSError, ValueError, KeyError, EOFError):
            return None

    def put(self, digest: str, tokens: np.ndarray, length: int) -> None:
        from scvnet_jax import files
        files.atomic_save_npz(self._path(digest), tokens=tokens, length=np.int32(length))


def bytes_per_image(model: AMES, db_len: int) -> int:
    """Bytes a database image takes in the token store (its db_len tokens + its length)."""
    per = (-(-model.arch.model_dim // 8) if model.arch.binarized else 2 * model.arch.model_dim)
    return int(db_len) * per + 4


def _db_tokens_of(model: AMES, feats) -> np.ndarray:
    """Store format of LocalFeatures `feats`: packed bits (dist) or float16 tokens (fp)."""
    tokens = model.db_tokens(np.asarray(feats.desc, np.float32), feats.mask)
    return pack_codes(tokens) if model.arch.binarized else tokens


def database_tokens(model: AMES, retrieval_model, refs, *, detector=None, topk: int = 50,
                    scales=None, cache_dir: str | None = None, batch_size: int = 0,
                    bucket: int = 64, workers: int = 4, desc: str = "ames db"):
    """(tokens (n, topk, ...), mask (n, topk) True = padding) of database images `refs` (topk:
    the database side's number of local descriptors, `db_len`), in
    the store format (`db_format` "packed" for dist models, "tokens" for fp), from the
    content-keyed `TokenStore` in cache_dir where present, else extracted (float32 local
    descriptors, exactly the official rows) and stored."""
    width = -(-model.arch.model_dim // 8) if model.arch.binarized else model.arch.model_dim
    return stored_local_rows(
        retrieval_model, refs, lambda feats: _db_tokens_of(model, feats),
        (width,), np.uint8 if model.arch.binarized else np.float16,
        {"token_format": 1, "ames": _fingerprint(model)}, detector=detector, topk=topk,
        scales=scales, cache_dir=cache_dir, batch_size=batch_size, bucket=bucket,
        workers=workers, desc=desc)


def stored_local_rows(retrieval_model, refs, convert, shape, dtype, key: Mapping, *,
                      detector=None, topk: int = 50, scales=None,
                      cache_dir: str | None = None, kind: str = "ames-tokens",
                      batch_size: int = 0, bucket: int = 64, workers: int = 4,
                      desc: str = "ames db"):
    """(rows (n, topk, *shape) `dtype`, mask (n, topk) True = padding) of images `refs`:
    `convert(LocalFeatures)` of their float32 local descriptors (`engine.local.extract_local`),
    from a content-keyed `TokenStore` (`kind`) in cache_dir where present, else extracted
    and stored. `key`: what the rows depend on besides the backbone, detector, topk, scales."""
    from concurrent.futures import ThreadPoolExecutor

    from scvnet_jax.engine import local
    from scvnet_jax.engine.cache import BACKBONE, content_digests, weights_fingerprint
    scales = tuple(scales or local.SCALES)
    n, topk = len(refs), int(topk)
    tokens = np.zeros((n, topk, *shape), dtype)
    length = np.zeros((n,), np.int64)
    store = digests = None
    todo = list(range(n))
    if cache_dir and n:
        key = {**key,
               "backbone": weights_fingerprint(retrieval_model.variables, BACKBONE),
               "model_dtype": jnp.dtype(retrieval_model.module.dtype).name,
               "precision": str(getattr(retrieval_model.module, "precision", None)),
               "detector": None if detector is None else detector.fingerprint,
               "topk": topk, "scales": [float(s) for s in scales]}
        store = TokenStore(cache_dir, key, kind)
        with ThreadPoolExecutor(workers) as pool:
            digests = content_digests(refs, pool)
        todo = []
        for i, dg in enumerate(digests):
            got = store.get(dg)
            if got is None or got[0].shape != tokens.shape[1:] or got[0].dtype != tokens.dtype:
                todo.append(i)
            else:
                tokens[i], length[i] = got
    step = 256                      # images per extraction call: stored as they finish
    for s in range(0, len(todo), step):
        part = todo[s:s + step]
        feats = local.extract_local(retrieval_model, [refs[i] for i in part], detector,
                                    topk, scales, batch_size, bucket=bucket,
                                    dtype=np.float32, workers=workers,
                                    desc=f"{desc} ({len(todo)} to extract)")
        toks = convert(feats)
        for row, i in enumerate(part):
            tokens[i], length[i] = toks[row], feats.length[row]
            if store is not None:
                store.put(digests[i], toks[row], int(feats.length[row]))
    mask = np.arange(topk)[None, :] >= length[:, None]
    return tokens, mask


def _fingerprint(model: AMES) -> str:
    from scvnet_jax.engine.cache import weights_fingerprint
    if getattr(model, "_fp", None) is None:
        model._fp = weights_fingerprint(model.variables) + "|" + str(model.arch)
    return model._fp


def _image_refs(items, what: str) -> list:
    """ImageRefs of `items`: ImageRefs as they are, paths (str or Path) as whole images."""
    from scvnet_jax.images import ImageRef
    out = []
    for i, r in enumerate(items):
        if isinstance(r, ImageRef):
            out.append(r)
        elif isinstance(r, (str, os.PathLike)):
            out.append(ImageRef(os.fspath(r)))
        else:
            raise InputError(f"ames.rerank_images: {what}[{i}] is a {type(r).__name__}; "
                             "expected an image file path (str or Path) or an ImageRef")
    return out


def rerank_images(model: AMES, retrieval_model, query_refs, db_refs, ranks, sims, *,
                  detector=None, k: int | None = None, lamb: float | None = None,
                  temp: float | None = None, query_len: int | None = None,
                  db_len: int | None = None, scales=None,
                  protocol: str = "blind", gnd=None, cache_dir: str | None = None,
                  batch_size: int = 64, extract_batch_size: int = 0, bucket: int = 64,
                  workers: int = 4):
    """AMES re-ranking of a first stage over image files: (ranks, sims) (N or K, nq), best
    first. query_refs, db_refs: image file paths (str or Path) or ImageRefs (a query's
    may carry its box). The local descriptors of the queries (cropped to their boxes) and
    of the shortlisted database images only (never the whole database: +1M costs the top k
    of each query) are extracted with `retrieval_model` (+ `detector`): the strongest `query_len`
    of a query, `db_len` of a database image (asymmetric, as the authors evaluate: the first
    k rows of a top-K extraction are the top-k extraction's), the database's kept in the
    token store (`cache_dir`). None settings come from `settings_of(model)`.

    Returns {setting: (ranks (same shape as given), scores (k', nq))}: setting "" for
    protocol "blind"; "medium" and "hard" for "official" (see `shortlist`)."""
    from scvnet_jax.engine import local
    query_refs, db_refs = _image_refs(query_refs, "query_refs"), _image_refs(db_refs, "db_refs")
    d = settings_of(model)
    k = int(k or d["k"])
    lamb = d["lamb"] if lamb is None else float(lamb)
    temp = d["temp"] if temp is None else float(temp)
    query_len = int(query_len or d["query_len"])
    db_len = int(db_len or d["db_len"])
    scales = tuple(scales or d["scales"])
    ranks, sims = _check_shortlist(ranks, sims)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"ames: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    dim = local.descriptor_dim(retrieval_model, detector)
    if dim != model.arch.local_dim:
        raise ConfigError(f"ames: the model reads {model.arch.local_dim}-d local descriptors; "
                          f"this backbone{' + detector' if detector is not None else ''} gives "
                          f"{dim}-d" + ("" if detector is not None else
                                        " (official AMES weights need the official detector)"))
    settings = ("",) if protocol == "blind" else SETTINGS
    if protocol == "official" and gnd is None:
        raise ConfigError("ames: protocol 'official' needs the ground truth; use 'blind' on "
                          "data without labels")
    g = gnd["gnd"] if isinstance(gnd, Mapping) else gnd
    # the shortlist depth: enough rows that moving junk (+ easy) out still leaves k
    depth = k
    if protocol == "official":
        depth += max((len(x.get("junk", ())) + len(x.get("easy", ())) for x in g), default=0)
    depth = min(depth, ranks.shape[0])
    lists = {s: shortlist(ranks[:depth], sims[:depth], protocol=protocol, gnd=gnd,
                          setting=s or "medium") for s in settings}
    kk = min(k, depth)
    union = np.unique(np.concatenate([r[:kk].reshape(-1) for r, _ in lists.values()]))
    q_feats = local.extract_local(retrieval_model, list(query_refs), detector, query_len, scales,
                                  extract_batch_size, bucket=bucket, dtype=np.float32,
                                  workers=workers, desc="ames queries")
    tokens, mask = database_tokens(model, retrieval_model, [db_refs[i] for i in union],
                                   detector=detector, topk=db_len, scales=scales,
                                   cache_dir=cache_dir, batch_size=extract_batch_size,
                                   bucket=bucket, workers=workers)
    where = np.full(int(ranks.max()) + 1, -1, np.int64)
    where[union] = np.arange(len(union))
    fmt = "packed" if model.arch.binarized else "tokens"
    out = {}
    for s, (r, v) in lists.items():
        logits = model.shortlist_logits(np.asarray(q_feats.desc, np.float32), q_feats.mask,
                                        tokens, mask, where[r[:kk]], db_format=fmt,
                                        batch_size=batch_size)
        rr, scores = combine(r, v, logits, k=kk, lamb=lamb, temp=temp)
        full = ranks.copy()
        full[:depth] = rr
        out[s] = (full, scores)
    return out


def __getattr__(name: str):
    # the extraction side lives with the engine (engine/local.py); here for the contract
    # `sj.rerank.ames.local_descriptors(...)` etc.
    if name in ("local_descriptors", "detector_from_state_dict", "load_detector",
                "extract_local", "describe_local", "LocalFeatures", "Detector"):
        from scvnet_jax.engine import local
        return getattr(local, name)
    raise AttributeError(f"module 'scvnet_jax.rerank.ames' has no attribute {name!r}")


__all__ = ["AMES", "TokenStore", "database_tokens", "rerank_images", "settings_of",
           "stored_local_rows",
           "bytes_per_image", "combine", "from_state_dict", "infer_arch", "load", "pack_codes",
           "rerank", "shortlist", "shortlist_map", "split_features", "unpack_codes"]
