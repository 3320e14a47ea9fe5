"""The AMES model with its weights (`AMESReranker`, wrapping the Flax module
`scvnet_jax.models.ames.AMES`), its loading (an official checkpoint or a model directory),
its defaults (`settings_of`) and the codes of binarized models (`pack_codes`)."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scvnet_jax.errors import CheckpointError, ConfigError, InputError

DTYPES = ("float32", "float64")
DB_FORMATS = ("local", "tokens", "packed")
DESCRIPTOR_COLUMN, MASK_COLUMN = 5, 3       # hdf5 `features`: x, y, scale, mask, weight, desc


def _arch_type():
    from scvnet_jax.models.ames import AMESArch
    return AMESArch


@partial(jax.jit, static_argnames=("module", "method", "options"))
def _apply(module, method, options, variables, *args):
    return module.apply(variables, *args, method=method, **dict(options))


def _pairs_fn(module, variables, src_all, mask_all, qi, db, db_mask, db_format):
    """Logits of pairs (query qi[b], db[b]): the queries' tokens stay on the device and are
    gathered there, not copied from the host with every batch."""
    if db_format == "local":
        db = module.apply(variables, db, method="encode_db")
    return module.apply(variables, src_all[qi], mask_all[qi], db, db_mask,
                        method="from_tokens")


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


class AMESReranker:
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
        return f"AMESReranker({self.arch}, dtype={self.dtype}, source={self.source!r})"

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
            # queries padded to a power of two: the remap and the pair program compile once
            # per bucket of query counts, not once per count
            rows_q = 1 << (nq - 1).bit_length()
            src_all = _apply(self.module, "remap", (), variables,
                             _pad_rows(self._local(q_local), rows_q))
            mask_all = jnp.asarray(_pad_rows(q_mask, rows_q))
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
                logits = _pairs(self.module, variables, src_all, mask_all, q.astype(np.int32),
                                rows, m, fmt)
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

# -- loading --------------------------------------------------------------------------------

def from_state_dict(state_dict: Mapping, local_dim: int = 1024, model_dim: int = 128,
                    nhead: int = 2, num_encoder_layers: int = 5, dim_feedforward: int = 1024,
                    binarized: bool = False, *, activation: str = "relu",
                    normalize_before: bool = False, source: str = "state dict",
                    dtype: str = "float32") -> AMESReranker:
    """An AMES from an official state dict ({name: NumPy array}, PyTorch layouts; the
    official `AMES(...)` arguments, defaults conf/model/ames.yaml with 1024-d descriptors),
    checked key by key and shape by shape against the architecture (one grouped error)."""
    from scvnet_jax.convert.checkpoints import variables_from_state_dict
    from scvnet_jax.models.ames import abstract_variables
    arch, variables = variables_from_state_dict(
        lambda: _arch_type()(local_dim=local_dim, model_dim=model_dim, nhead=nhead,
                             num_encoder_layers=num_encoder_layers,
                             dim_feedforward=dim_feedforward, binarized=binarized,
                             activation=activation, normalize_before=normalize_before),
        state_dict, source, abstract_variables)
    return AMESReranker(arch, variables, source, dtype)


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
        from scvnet_jax.convert.checkpoints import not_a_state_dict
        raise not_a_state_dict(source, "AMES", err, sd) from None
    heads = 2 if nhead is None else int(nhead)
    if model_dim % heads:
        raise CheckpointError(f"{source}: model_dim {model_dim} is not a multiple of nhead "
                              f"{heads}" + ("" if nhead else " (the official default); pass "
                                            "nhead="))
    return dict(local_dim=int(local_dim), model_dim=int(model_dim), nhead=heads,
                num_encoder_layers=layers, dim_feedforward=int(ff), binarized=binarized,
                normalize_before="decoder.norm.weight" in sd)


def load(path, nhead: int | None = None, *, activation: str = "relu",
         dtype: str = "float32") -> AMESReranker:
    """An AMES from an official checkpoint (`torch.save({'state': state_dict, ...})`, read
    without torch through the restricted unpickler; the architecture is read off the state
    dict, nhead (not recorded) defaults to 2, the official configuration's) or from a model
    directory we wrote (kind "ames"). dtype: see AMESReranker."""
    from scvnet_jax.convert import checkpoints
    from scvnet_jax.convert.model_dir import is_model_dir

    if is_model_dir(path):
        arch, variables, meta = checkpoints.read_model_dir(path, "ames")
        if nhead is not None and int(nhead) != arch.nhead:
            raise CheckpointError(f"{path}: holds an AMES with {arch.nhead} heads, not "
                                  f"{nhead}")
        out = AMESReranker(arch, variables, str(path), dtype)
        out.meta = meta
        return out
    sd, source = checkpoints.official_state_dict(path, "AMES", "state",
                                                 "{'state': state_dict}")
    return from_state_dict(sd, **infer_arch(sd, source, nhead), activation=activation,
                           source=source, dtype=dtype)


# -- on images: local descriptors, the database-token store, the defaults -------------------

# The authors' best (lamb, temp) for CVNet descriptors (README of github pavelsuma/ames),
# by variant; their README command's asymmetric lengths (600 query descriptors, 50 per
# database image: the database side is what is stored) and shortlist.
OFFICIAL_DEFAULTS = {False: {"lamb": 0.85, "temp": 0.8}, True: {"lamb": 0.65, "temp": 0.2}}
OFFICIAL_K, OFFICIAL_QUERY_LEN, OFFICIAL_DB_LEN = 100, 600, 50


def settings_of(model: AMESReranker) -> dict:
    """What `rerank_images` uses unless told otherwise: lamb, temp, mix (the chamfer share
    of the local score: 0, the official scoring, unless the model records one),
    chamfer_logit and chamfer_center (a model trained on top of chamfer: logit + a x
    (chamfer - c)), k, query_len and db_len (local descriptors per query / database
    image), scales, detector ('' = none), backbone ('' = the caller's), from the model
    directory's meta for models we trained (the upper ends of their training ranges), else
    the authors' settings."""
    from scvnet_jax.engine.local import SCALES
    out = {**OFFICIAL_DEFAULTS[bool(model.arch.binarized)], "mix": 0.0, "chamfer_logit": 0.0,
           "chamfer_center": 0.0, "k": OFFICIAL_K,
           "query_len": OFFICIAL_QUERY_LEN, "db_len": OFFICIAL_DB_LEN,
           "scales": tuple(SCALES), "detector": None, "backbone": ""}
    meta = getattr(model, "meta", None) or {}
    d, r = meta.get("descriptors") or {}, meta.get("rerank") or {}
    if d:
        out.update(query_len=int(d.get("query_len", out["query_len"])),
                   db_len=int(d.get("db_len", out["db_len"])),
                   scales=tuple(float(s) for s in d.get("scales", out["scales"])),
                   detector=d.get("detector") or "", backbone=str(d.get("model", "")))
    for key in ("lamb", "temp", "mix", "chamfer_logit", "chamfer_center", "k"):
        if key in r:
            out[key] = type(out[key])(r[key])
    return out
