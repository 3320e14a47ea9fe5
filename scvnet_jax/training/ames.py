"""The "ames" stage: the AMES reranker (a transformer over the local descriptors of a query and
a database image, ECCV 2024) trained on pairs of training images, the first public AMES
training (the authors released weights and evaluation code only).

Per step: a batch of (query, candidate) pairs; label 1 when both show the same landmark.
Each image is its bank entry (below) cut to a number of local descriptors drawn for this
pair (`ames.query_len`, `ames.db_len`: uniform in [lo, hi], the strongest first, the rest
masked as padding), so one model serves several test-time budgets ("universal", as the
paper's asymmetric query/database sizes). The loss is binary cross-entropy on the logit;
a binarized student (`ames.binarized`) adds `distill_weight` x BCE against the sigmoid of
a full-precision teacher's logit on the same pair (`ames.teacher`, frozen, eval mode).
The binarization is the official training path (erf of the projection; sign at test).

Pairs as cvnet_rerank draws them: a positive with probability
`positive_fraction` (another image of the query's landmark; the image itself for a
landmark with one image), else a negative: with the curriculum's probability a hard one
(from the query's row of the hard-negative table: its top-ranked images of other
landmarks by the `ames.family` global descriptor of `ames.model`), else a uniformly drawn
image of another landmark.

The bank (W/ames_bank/): for every whole training image, its top `ames.topk` local
descriptors exactly as eval.py extracts them for a database image (`engine.local`: the
CVNet stage-3 features at 3 scales, the detector's or the L2 norm's selection), float16,
with each image's number of real rows; built once, chunk by chunk (every process its own
chunks, so a killed run resumes where it stopped), and reused on resume; plus the
hard-negative table. Read lazily (memory-mapped): a bank of GLDv2's 1.6M images at 700 x
1024 float16 is 2.3 TB, so each process reads only the rows its pairs touch.

What comes from the paper (Suma et al., ECCV 2024) and the official code: the model
(`models.ames`, official names), its training-mode forward (no float16 rounding; erf for
the binarized projection), binary cross-entropy on image pairs, hard negatives mined
with global descriptors, variable numbers of query/database descriptors, distillation of
the binarized model from a full-precision one. Our choices (no training code was
released): the pair sampler and its curriculum (cvnet_rerank's), the distillation loss's form
(BCE to the teacher's probability), AdamW + warmup + cosine, and every number in
configs/ames_*.py.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from scvnet_jax import files, mesh as mesh_lib
from scvnet_jax.data.augment import augment
from scvnet_jax.data.sources import Records, TrainingSet, process_batches
from scvnet_jax.errors import ConfigError
from scvnet_jax.training import optim
from scvnet_jax.training.loop import (Task as _Task, all_finite, host, retrieval_model,
                                     with_position)
from scvnet_jax.training.stage2 import hard_negative_table, linear_ramp


@flax.struct.dataclass
class AMESState:
    step: jax.Array
    params: Any
    opt_state: Any
    teacher: Any        # {'params'} of the frozen full-precision teacher, or {} (none)


def ames_arch(cfg, local_dim: int):
    """The AMESArch of cfg.ames for descriptors of `local_dim`."""
    from scvnet_jax.models.ames import AMESArch
    a = cfg.ames
    try:
        return AMESArch(local_dim=int(local_dim), model_dim=int(a.model_dim),
                        nhead=int(a.nhead), num_encoder_layers=int(a.num_encoder_layers),
                        dim_feedforward=int(a.dim_feedforward), binarized=bool(a.binarized))
    except ValueError as e:
        raise ConfigError(f"config.ames: {e}") from None


def module(arch):
    from scvnet_jax.models.ames import AMES
    return AMES(arch)


def lengths(cfg) -> tuple[int, int]:
    """Padded sequence lengths (query, database) of a training pair."""
    return int(cfg.ames.query_len[1]), int(cfg.ames.db_len[1])


def init_state(cfg, arch, rng, params=None, teacher=None) -> AMESState:
    if params is None:
        lq, ld = lengths(cfg)
        q = jnp.zeros((1, lq, arch.local_dim), jnp.float32)
        d = jnp.zeros((1, ld, arch.local_dim), jnp.float32)
        mq, md = jnp.zeros((1, lq), bool), jnp.zeros((1, ld), bool)
        params = module(arch).init(rng, q, mq, d, md)["params"]
    return AMESState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=optim.optimizer(cfg).init(params), teacher=teacher or {})


def make_train_step(cfg, arch, teacher_arch=None) -> Callable:
    """The pure step (state, batch) -> (state, metrics); batch = {'q', 'd': (B, L, D)
    float32 local descriptors, 'q_mask', 'd_mask': (B, L) bool (True = padding), 'label':
    (B,) int32 1 = same landmark, 'hard': (B,) bool}."""
    net = module(arch)
    teacher_net = module(teacher_arch) if teacher_arch is not None else None
    tx = optim.optimizer(cfg)
    lr = optim.learning_rate(cfg)
    w = float(cfg.ames.distill_weight)
    ca = float(cfg.ames.get("chamfer_logit", 0.0))
    cc = float(cfg.ames.get("chamfer_center", 0.0))
    base_key = jax.random.PRNGKey(int(cfg.seed) + 4)

    def step(state: AMESState, batch: dict):
        rng = jax.random.fold_in(base_key, state.step)
        y = batch["label"].astype(jnp.float32)
        args = (batch["q"], batch["q_mask"], batch["d"], batch["d_mask"])
        soft = None
        if teacher_net is not None:
            soft = jax.nn.sigmoid(jax.lax.stop_gradient(
                teacher_net.apply({"params": state.teacher}, *args)))

        def loss_fn(params):
            logits = net.apply({"params": params}, *args, train=True,
                               rngs={"dropout": rng}).astype(jnp.float32)
            if ca:                  # the model learns what the chamfer score misses
                logits = logits + ca * (batch["chamfer"] - cc)
            bce = optax.sigmoid_binary_cross_entropy(logits, y).mean()
            distill = (optax.sigmoid_binary_cross_entropy(logits, soft).mean()
                       if soft is not None else jnp.zeros(()))
            return bce + w * distill, (logits, bce, distill)

        (loss, (logits, bce, distill)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = ((logits > 0).astype(jnp.float32) == y).astype(jnp.float32)
        pos, neg = y == 1, y == 0
        hard = batch["hard"] & neg

        def mean_where(v, m):
            return jnp.sum(jnp.where(m, v, 0.0)) / jnp.maximum(jnp.sum(m), 1)

        metrics = {"loss": loss, "loss_bce": bce, "loss_distill": distill,
                   "accuracy": correct.mean(), "positive_accuracy": mean_where(correct, pos),
                   "negative_accuracy": mean_where(correct, neg),
                   "hard_negative_accuracy": mean_where(correct, hard),
                   "hard_fraction": jnp.sum(hard) / jnp.maximum(jnp.sum(neg), 1),
                   "lr": lr(state.step), "grad_norm": optax.global_norm(grads),
                   "finite": jnp.isfinite(loss) & all_finite(params)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


# -- data ---------------------------------------------------------------------------------

class PairTransform(Records, grain.transforms.RandomMap):
    """(stream position, index) -> one training pair from the bank (read lazily: the
    transform pickles without it)."""

    def __init__(self, ts: TrainingSet, bank_dir: str, query_len, db_len,
                 positive_fraction: float, hard_ratio, curriculum_steps: int,
                 global_batch: int, subset: str = "top", n_train: int | None = None,
                 same_image: float = 0.0, chamfer_logit: float = 0.0):
        super().__init__(ts)
        self.chamfer_logit = float(chamfer_logit)
        self.same_image = float(same_image)
        self.n_train = int(ts.num_examples if n_train is None else n_train)
        self.bank_dir = str(bank_dir)
        self.query_len, self.db_len = tuple(int(v) for v in query_len), tuple(
            int(v) for v in db_len)
        self.positive_fraction = float(positive_fraction)
        self.hard_ratio = tuple(float(v) for v in hard_ratio)
        self.curriculum_steps, self.global_batch = int(curriculum_steps), int(global_batch)
        self.subset = str(subset)
        self._bank = None

    def __getstate__(self):
        return {**super().__getstate__(), "_bank": None}

    def bank(self):
        if self._bank is None:      # built whole, then published (grain threads share it)
            self._bank = Bank(self.bank_dir)
        return self._bank

    def _side(self, i: int, lim: tuple[int, int], rng: np.random.Generator,
              view: int | None = None):
        bank = self.bank()
        desc, n = bank.get(i, int(rng.integers(0, bank.views)) if view is None else view)
        keep = min(int(rng.integers(lim[0], lim[1] + 1)), n)
        out = np.zeros((lim[1], desc.shape[1]), np.float32)
        if self.subset == "random":     # a random subset of the real rows, in weight order
            out[:keep] = desc[np.sort(rng.choice(n, keep, replace=False))]
        else:                           # the strongest rows, as at test time
            out[:keep] = desc[:keep]
        mask = np.ones((lim[1],), bool)
        mask[:keep] = False
        return out, mask

    def random_map(self, element: Any, rng: np.random.Generator) -> dict:
        position, index = (int(v) for v in element)
        step = position // self.global_batch
        label = self.ts_label(index)
        lo, hi = self.class_range(index, label)
        hard = False
        views = None
        if rng.random() < self.positive_fraction:
            target = 1
            other = index if hi - lo == 1 else self.other_in(lo, hi, index, rng)
            if self.same_image and rng.random() < self.same_image and self.bank().views > 1:
                other = index           # two views of one image: content they share
                views = [int(v) for v in rng.choice(self.bank().views, 2, replace=False)]
        else:
            target = 0
            other = None
            if rng.random() < linear_ramp(*self.hard_ratio, self.curriculum_steps, step):
                row = self.bank().hard[index]
                row = row[row >= 0]
                if len(row):
                    other, hard = int(row[rng.integers(0, len(row))]), True
            if other is None:           # uniform over the training images of other landmarks
                n = self.n_train
                j = int(rng.integers(0, n - (hi - lo)))
                other = j + (hi - lo) * (j >= lo)
        q_view, d_view = views or (None, None)
        q, qm = self._side(index, self.query_len, rng, q_view)
        d, dm = self._side(other, self.db_len, rng, d_view)
        out = {"q": q, "q_mask": qm, "d": d, "d_mask": dm, "label": np.int32(target),
               "hard": np.bool_(hard)}
        if self.chamfer_logit:
            out["chamfer"] = pair_chamfer(q, qm, d, dm)
        return out

    def ts_label(self, index: int) -> int:
        return int(self.bank().labels[index])


def pair_chamfer(q, q_mask, d, d_mask) -> np.float32:
    """The chamfer score of one pair (`rerank.chamfer.scores`' on the host): the mean over
    the query's real rows of their best cosine among the database image's real rows."""
    def unit(x):
        x = np.asarray(x, np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    qv, dv = unit(q)[~np.asarray(q_mask)], unit(d)[~np.asarray(d_mask)]
    if len(qv) == 0 or len(dv) == 0:
        return np.float32(0.0)
    return np.float32((qv @ dv.T).max(axis=1).mean())


INITS = ("random", "matching")


def pca_projection(bank: "Bank", n_images: int, model_dim: int, *, max_rows: int = 200_000
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (local_dim, model_dim), bias (model_dim,)) of remap_local's first Linear as
    the principal directions of the L2-normalised local descriptors of the first `n_images`
    bank images (view 0, real rows; at most `max_rows`, evenly spaced): tokens start as
    the descriptors' coordinates in the top `model_dim` directions, centred, so that the
    projection keeps what tells descriptors apart instead of a random subspace of it."""
    rows = []
    for i in range(n_images):
        d, n = bank.get(i, 0)
        rows.append(np.asarray(d[:n], np.float64))
    x = np.concatenate(rows)
    if len(x) > max_rows:
        x = x[np.linspace(0, len(x) - 1, max_rows).astype(np.int64)]
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    mean = x.mean(0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = min(model_dim, len(sv))
    kernel = np.zeros((x.shape[1], model_dim))
    kernel[:, :k] = vt[:k].T
    for j in range(k):                        # a deterministic sign: largest entry positive
        if kernel[np.argmax(np.abs(kernel[:, j])), j] < 0:
            kernel[:, j] *= -1
    return kernel.astype(np.float32), (-(mean @ kernel)).astype(np.float32)


def matching_init(params, arch, kernel, bias):
    """`ames.init = "matching"`: params (from the official initialisation) with remap_local's
    projection the descriptors' principal directions (`pca_projection`; a binarized model's
    W, which then gives sign bits of them) and every attention's query and key projections
    the identity (value and output projections as initialised), so that from the first
    step attention weighs tokens by the similarity of their descriptors: cross-attention
    starts as descriptor matching instead of having to learn it from the pairs."""
    params = flax.core.unfreeze(jax.tree.map(np.asarray, params))
    if arch.binarized:
        params["remap_local_0"] = {"W": kernel}
    else:
        params["remap_local_0"] = {"kernel": kernel, "bias": bias}
    d = arch.model_dim
    for layer in params["decoder"].values():
        for att in ("self_attn", "cross_attn"):
            w = np.array(layer[att]["in_proj_weight"])
            w[:d] = np.eye(d, dtype=w.dtype)
            w[d:2 * d] = np.eye(d, dtype=w.dtype)
            layer[att]["in_proj_weight"] = w
    return jax.tree.map(jnp.asarray, params)


def split(ts, holdout_classes: int) -> int:
    """The number of training images pairs are drawn from: all but the last
    `holdout_classes` classes' (kept for choosing lamb and temp, `tune`)."""
    offsets = np.asarray(ts.class_offsets)
    n_classes = len(offsets) - 1
    if not 0 <= int(holdout_classes) < n_classes:
        raise ConfigError(f"config.ames.holdout_classes = {holdout_classes}: expected 0 .. "
                          f"{n_classes - 1} (the training set has {n_classes} classes)")
    return int(offsets[n_classes - int(holdout_classes)])


def pair_dataset(ts: TrainingSet, bank_dir, cfg, *, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
    """This process's part of the batched, shuffled, repeated stream of pairs (queries and
    candidates from the training classes, never the held-out ones); each pair's randomness
    comes from its global position (resumable, process-count independent)."""
    a = cfg.ames
    n_train = split(ts, int(a.get("holdout_classes", 0)))
    t = PairTransform(ts, bank_dir, a.query_len, a.db_len, a.positive_fraction,
                      a.hard_ratio, int(cfg.total_steps), int(cfg.batch_size),
                      a.get("subset", "top"), n_train, float(a.get("same_image", 0.0)),
                      float(a.get("chamfer_logit", 0.0)))
    ds = (grain.MapDataset.range(n_train).shuffle(seed=cfg.seed).repeat(None)
          .map_with_index(with_position).random_map(t, seed=cfg.seed))
    return process_batches(ds, int(cfg.batch_size), process_index, process_count)


# -- the bank -----------------------------------------------------------------------------

BANK_CHUNK = 256


class Bank:
    """W/ames_bank/: local_NNNNN.npz per chunk of BANK_CHUNK training images (desc (n, V,
    topk, D) float16, length (n, V); view 0 the whole image, views 1.. random augmentations
    of it, `ames.bank_views` = V), hard.npy (n_train, bank_k) int32 (-1 = none; training
    classes only), global.npy (N, D) float32 (the `ames.family` descriptors), labels.npy
    (N,), key.json (the settings it was built with) and done.json (the same, written
    last: the bank is complete)."""

    def __init__(self, path):
        self.path = Path(path)
        self.labels = np.load(self.path / "labels.npy")
        self.hard = np.load(self.path / "hard.npy", mmap_mode="r")
        self._chunks: dict = {}

    def get(self, i: int, view: int = 0) -> tuple[np.ndarray, int]:
        """(descriptors (topk, D) float16, number of real rows) of image i's `view`."""
        c = i // BANK_CHUNK
        if c not in self._chunks:
            with np.load(self.path / f"local_{c:05d}.npz") as z:
                desc, length = z["desc"], z["length"]
            if desc.ndim == 3:               # one view per image
                desc, length = desc[:, None], length[:, None]
            self._chunks[c] = (desc, length)
        desc, length = self._chunks[c]
        return desc[i - c * BANK_CHUNK, view], int(length[i - c * BANK_CHUNK, view])

    @property
    def views(self) -> int:
        return self._chunk0()[0].shape[1]

    def _chunk0(self):
        self.get(0)
        return self._chunks[0]


def heldout_split(bank_dir, start: int):
    """The held-out images of a bank (rows start..): each class's first 2 images query the
    rest. Returns a namespace: bank, idx (bank rows), labels, qi / di (rows of idx: queries,
    database), ranks and sims (K, nq) of the first stage (the bank's global descriptors),
    desc / mask (len(idx), topk, D) float32 local descriptors of view 0 (True = padding)."""
    import types

    from scvnet_jax.engine import search
    bank = Bank(bank_dir)
    idx = np.arange(int(start), len(bank.labels))
    labels = np.asarray(bank.labels)[idx]
    first = np.r_[0, np.flatnonzero(np.diff(labels)) + 1]
    qi = np.sort(np.concatenate([f + np.arange(2) for f in first]))
    di = np.setdiff1d(np.arange(len(idx)), qi)
    glob = np.load(Path(bank_dir) / "global.npy")
    sim, ranks = search.rank(glob[idx[di]], glob[idx[qi]])
    local = [bank.get(int(i)) for i in idx]
    desc = np.stack([d.astype(np.float32) for d, _ in local])
    mask = np.arange(desc.shape[1])[None, :] >= np.array([n for _, n in local])[:, None]
    return types.SimpleNamespace(bank=bank, idx=idx, labels=labels, qi=qi, di=di,
                                 ranks=ranks, sims=np.take_along_axis(sim, ranks, axis=0),
                                 desc=desc, mask=mask)


LAMBS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)
TEMPS = (0.1, 0.2, 0.5, 0.8, 1.0, 2.0)
MIXES = (0.0, 0.25, 0.5, 0.75)


def tune(bank_dir, arch, params, ts, holdout_classes: int, k: int,
         mixes: tuple = (0.0,), chamfer_logit: float = 0.0,
         chamfer_center: float = 0.0) -> dict:
    """lamb, temp (and mix) chosen on the held-out classes of the training set (the authors
    choose them on GLDv2's validation split): each held-out class's first 2 images query
    the rest of the held-out images, the first stage ranks by the bank's global
    descriptors, AMES scores each query's top k (every row of the bank: the database
    format at test time), and the (lamb, temp, mix) of the grid with the best mAP wins
    (lamb 1.0 = the first stage alone; the first in grid order on ties). mix > 0 shares
    the local part with the chamfer score of the same descriptors (`rerank.ames.combine`);
    `mixes` (0,) is the official scoring only. Returns {lamb, temp, mix, mAP, first_stage,
    chamfer (the chamfer reranker's best mAP over LAMBS and 0 on the same split), queries,
    database}."""
    from scvnet_jax import metrics
    from scvnet_jax.rerank import ames, chamfer

    h = heldout_split(bank_dir, split(ts, holdout_classes))
    labels, qi, di, sims, ranks, desc, mask = (h.labels, h.qi, h.di, h.sims, h.ranks, h.desc,
                                               h.mask)
    model = ames.AMESReranker(arch, {"params": params})
    kk = min(int(k), len(di))
    logits = model.shortlist_logits(desc[qi], mask[qi], desc[di], mask[di], ranks[:kk])
    top = ranks[:kk].T
    cham = chamfer.scores(desc[qi], mask[qi], desc[di][top], mask[di][top]).T

    def score(r):
        return metrics.labelled(r, labels[qi], labels[di])["mAP@all"]

    base = score(ranks)
    best = None
    for mix in mixes:
        for lamb in LAMBS:
            for temp in TEMPS:
                r, _ = ames.combine(ranks, sims, logits, k=kk, lamb=lamb, temp=temp,
                                    chamfer=cham, mix=mix, chamfer_logit=chamfer_logit,
                                    chamfer_center=chamfer_center)
                m = score(r)
                if best is None or m > best[0] + 1e-12:
                    best = (m, lamb, temp, mix)
    cham_map = max(score(chamfer.combine(ranks, sims, cham, k=kk, lamb=lamb)[0])
                   for lamb in (0.0,) + LAMBS)
    return {"lamb": best[1], "temp": best[2], "mix": best[3], "mAP": best[0],
            "first_stage": base, "chamfer": cham_map, "queries": int(len(qi)),
            "database": int(len(di))}


def check_config(cfg) -> None:
    """What the ames stage needs beyond `config.validate`."""
    from scvnet_jax.training import stage1
    a = cfg.ames
    if not a.model:
        raise ConfigError("the ames stage needs --config.ames.model: the retrieval model whose "
                          "local descriptors it reads (a model directory, an official CVNet "
                          "checkpoint, or 'demo' for the bundled demo model)")
    for name in ("model", "detector", "teacher"):
        v = str(a[name])
        if v and v != "demo" and not Path(v).expanduser().exists():
            raise ConfigError(f"config.ames.{name} = {v!r}: no such file or directory")
    for name in ("query_len", "db_len"):
        v = tuple(a[name])
        if (len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)
                or not 1 <= v[0] <= v[1] <= int(a.topk)):
            raise ConfigError(f"config.ames.{name} = {v}: expected (lo, hi) integers with "
                              f"1 <= lo <= hi <= ames.topk ({a.topk})")
    hr = tuple(a.hard_ratio)
    if len(hr) != 2 or not all(0.0 <= float(x) <= 1.0 for x in hr):
        raise ConfigError(f"config.ames.hard_ratio = {hr}: expected (start, end) probabilities")
    if a.teacher and not a.binarized:
        raise ConfigError("config.ames.teacher is for a binarized student "
                          "(config.ames.binarized = True)")
    if a.init not in INITS:
        raise ConfigError(f"config.ames.init = {a.init!r}: expected one of {INITS}")
    if not 0.0 <= float(a.same_image) <= 1.0:
        raise ConfigError(f"config.ames.same_image = {a.same_image}: expected a probability")
    if float(a.same_image) > 0 and int(a.bank_views) < 2:
        raise ConfigError(f"config.ames.same_image = {a.same_image} needs two views of each "
                          f"image in the bank (config.ames.bank_views >= 2, got "
                          f"{a.bank_views})")
    if bool(a.get("tune_mix", False)) and int(a.holdout_classes) < 1:
        raise ConfigError("config.ames.tune_mix = True chooses mix on held-out classes: it "
                          "needs config.ames.holdout_classes >= 1 (got 0)")
    s = tuple(a.scales)
    if not s or not all(float(x) > 0 for x in s):
        raise ConfigError(f"config.ames.scales = {s}: expected positive scale factors")
    stage1.check_batch(cfg)


class Task(_Task):
    """The ames stage: the AMES reranker on a retrieval model's local descriptors."""
    name = "ames (the AMES reranker)"
    rate = "pairs_per_sec"
    bar_keys = (("loss", "loss"), ("accuracy", "acc"), ("hard_negative_accuracy", "hard acc"),
                ("lr", "lr"))

    def __init__(self, cfg, ts: TrainingSet, mesh, workdir):
        super().__init__(cfg, ts, mesh, workdir)
        self._model = self._detector = None
        self.arch = ames_arch(cfg, self.local_dim())
        self.teacher = self.teacher_model()
        t_arch = self.teacher.arch if self.teacher is not None else None
        abstract = jax.eval_shape(
            lambda k: init_state(cfg, self.arch, k, teacher=self._teacher_params()),
            jax.random.PRNGKey(0))
        self.compile(make_train_step(cfg, self.arch, t_arch),
                     lambda k, p, t: init_state(cfg, self.arch, k, p, t), abstract)

    @staticmethod
    def check_config(cfg) -> None:
        check_config(cfg)

    # the models the bank comes from
    def retrieval_model(self):
        if self._model is None:
            self._model = retrieval_model(self.cfg.ames.model)
        return self._model

    def detector(self):
        if self._detector is None and self.cfg.ames.detector:
            from scvnet_jax.engine import local
            self._detector = local.load_detector(self.cfg.ames.detector)
        return self._detector

    def local_dim(self) -> int:
        from scvnet_jax.engine import local
        return local.descriptor_dim(self.retrieval_model(), self.detector())

    def teacher_model(self):
        if not self.cfg.ames.teacher:
            return None
        from scvnet_jax.rerank import ames
        t = ames.load(self.cfg.ames.teacher)
        if t.arch.binarized or t.arch.local_dim != self.arch.local_dim:
            raise ConfigError(f"config.ames.teacher = {self.cfg.ames.teacher}: expected a "
                              f"full-precision AMES on {self.arch.local_dim}-d descriptors, "
                              f"got {t.arch}")
        return t

    def _teacher_params(self):
        if self.teacher is None:
            return {}
        return jax.tree.map(jnp.asarray, self.teacher.variables["params"])

    def initial_state(self):
        params = None
        if self.cfg.init_from:
            from scvnet_jax.rerank import ames
            start = ames.load(self.cfg.init_from)
            if start.arch != self.arch:
                raise ConfigError(f"config.init_from = {self.cfg.init_from}: holds "
                                  f"{start.arch}, the config asks for {self.arch}")
            params = jax.tree.map(jnp.asarray, start.variables["params"])
        elif self.cfg.ames.init == "matching":
            a = self.arch
            params = init_state(self.cfg, a, jax.random.PRNGKey(self.cfg.seed)).params
            kernel, bias = pca_projection(Bank(self.bank()),
                                          split(self.ts, self.cfg.ames.holdout_classes),
                                          a.model_dim)
            params = matching_init(params, a, kernel, bias)
        return self.init(jax.random.PRNGKey(self.cfg.seed), params, self._teacher_params())

    def bank(self) -> Path:
        """W/ames_bank/ (see `Bank`), built chunk by chunk and reused on resume."""
        from tqdm import tqdm

        from scvnet_jax.data.sources import Records as _Records
        from scvnet_jax.engine import extract, local

        import json

        a = self.cfg.ames
        path = self.workdir / "ames_bank"
        key = {"model": str(a.model), "detector": str(a.detector), "topk": int(a.topk),
               "views": int(a.bank_views), "view_augment": dict(self.view_augment().__dict__),
               "view_seed": int(self.cfg.seed) if int(a.bank_views) > 1 else None,
               "scales": [float(v) for v in a.scales], "family": str(a.family),
               "bank_k": int(a.bank_k), "holdout_classes": int(a.holdout_classes),
               "images": int(self.ts.num_examples), "data": str(self.cfg.data.name)}
        text = json.dumps(key, sort_keys=True)

        def read(name):
            try:
                return (path / name).read_text()
            except OSError:
                return None

        if read("done.json") == text:
            return path
        if read("key.json") != text and path.is_dir():     # a bank of other settings: ours
            for old in path.glob("*.np[yz]"):              # to replace, chunk by chunk
                old.unlink()
            (path / "done.json").unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
        if mesh_lib.process_index() == 0:
            files.atomic_write_text(path / "key.json", text)
        mesh_lib.barrier("ames_bank_key")
        t0 = time.perf_counter()
        model, det = self.retrieval_model(), self.detector()
        records = _Records(self.ts)
        n = self.ts.num_examples
        chunks = range(-(-n // BANK_CHUNK))
        mine = [c for c in chunks if mesh_lib.owner(c) == mesh_lib.process_index()]
        todo = [c for c in mine if not (path / f"local_{c:05d}.npz").is_file()]
        views, aug = int(a.bank_views), self.view_augment()
        with tqdm(total=views * sum(min(n, (c + 1) * BANK_CHUNK) - c * BANK_CHUNK
                                    for c in todo),
                  desc="ames bank (local)", unit="img", dynamic_ncols=True,
                  disable=mesh_lib.process_index() != 0) as bar:
            for c in todo:
                idx = range(c * BANK_CHUNK, min(n, (c + 1) * BANK_CHUNK))
                originals = [records.record(i)[0] for i in idx]
                descs, lengths = [], []
                for v in range(views):      # view v of image i: its own seed
                    images = originals if v == 0 else [
                        augment(im, aug, np.random.default_rng((int(self.cfg.seed), i, v)))
                        for i, im in zip(idx, originals)]
                    feats = local.describe_local(model, images, detector=det,
                                                 topk=int(a.topk), scales=tuple(a.scales),
                                                 batch_size=int(a.bank_batch_size),
                                                 bucket=int(a.bank_bucket), bar=bar)
                    descs.append(feats.desc.astype(np.float16))
                    lengths.append(feats.length.astype(np.int32))
                files.atomic_save_npz(path / f"local_{c:05d}.npz",
                                      desc=np.stack(descs, axis=1),
                                      length=np.stack(lengths, axis=1))
        mesh_lib.barrier("ames_bank_local")
        spec = extract.spec_of(a.family)
        glob = extract.extract_training_set(model, self.ts, spec,
                                            batch_size=int(a.bank_batch_size),
                                            bucket=int(a.bank_bucket),
                                            desc=f"ames bank ({a.family})")
        labels = self.ts.labels()
        n_train = split(self.ts, int(a.holdout_classes))
        table = hard_negative_table(glob[:n_train], labels[:n_train], int(a.bank_k))
        if mesh_lib.process_index() == 0:
            files.atomic_save_npy(path / "global.npy", glob.astype(np.float32))
            files.atomic_save_npy(path / "labels.npy", np.asarray(labels))
            files.atomic_save_npy(path / "hard.npy", table)
            files.atomic_write_text(path / "done.json", text)
            print(f"ames bank: {n} images x top-{a.topk} local descriptors "
                  f"({self.arch.local_dim}-d, float16) and top-{a.bank_k} hard negatives "
                  f"by {a.family}, {time.perf_counter() - t0:.1f} s")
        mesh_lib.barrier("ames_bank")
        return path

    def view_augment(self):
        """The augmentation of bank views 1..: data.augment's crops, flips and colour
        jitter, resized to ames.view_size."""
        from scvnet_jax.data.augment import Augment
        return Augment.from_config({**self.cfg.data.augment, "size": int(self.cfg.ames.view_size)})

    def iterator(self, step: int, state):
        ds = pair_dataset(self.ts, self.bank(), self.cfg,
                          process_index=jax.process_index(),
                          process_count=jax.process_count())
        return self.make_iterator(ds)

    def export(self, state, step: int) -> Path:
        from scvnet_jax.convert import model_dir

        a = self.cfg.ames
        rerank = {"lamb": float(a.lamb), "temp": float(a.temp), "mix": float(a.mix),
                  "chamfer_logit": float(a.chamfer_logit),
                  "chamfer_center": float(a.chamfer_center), "k": int(a.num_rerank)}
        tuned = None
        if int(a.holdout_classes) > 0:
            tuned = tune(self.bank(), self.arch, host(state.params), self.ts,
                         int(a.holdout_classes), int(a.num_rerank),
                         MIXES if a.tune_mix else (0.0,), float(a.chamfer_logit),
                         float(a.chamfer_center))
            rerank.update(lamb=tuned["lamb"], temp=tuned["temp"], mix=tuned["mix"])
            print(f"ames: lamb {tuned['lamb']}, temp {tuned['temp']}, mix {tuned['mix']} "
                  f"chosen on {a.holdout_classes} held-out classes: mAP "
                  f"{100 * tuned['mAP']:.2f} (first stage {100 * tuned['first_stage']:.2f}, "
                  f"chamfer {100 * tuned['chamfer']:.2f})")
        meta = {"trained_by": "scvnet_jax train.py, stage ames", "step": int(step),
                "descriptors": {"model": str(a.model), "detector": str(a.detector),
                                "query_len": int(a.query_len[1]), "db_len": int(a.db_len[1]),
                                "scales": [float(s) for s in a.scales]},
                "first_stage": {"cvnet": "cvnet_global",
                                "superglobal": "superglobal_global"}[a.family],
                "rerank": rerank, "tuned_on_holdout": tuned,
                "teacher": str(a.teacher), "data": self.cfg.data.name}
        return model_dir.save_model_dir(self.workdir / "model", self.arch,
                                        {"params": host(state.params)}, meta=meta,
                                        overwrite=True)
