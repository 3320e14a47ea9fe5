"""The "cvnet_rerank" stage (CVNet-Rerank): the cvnet_global backbone frozen, the per-scale
3x3 convs (`conv2ds_*`) and the CVLearner trained as a binary classifier of image pairs (same
landmark or not) with cross-entropy on the verification logits.

Per step: the frozen backbone (BatchNorm in inference mode, no gradient) gives the local
features (last stage-3 block) of the query and candidate images; Hide-and-Seek zeroes random
cells of both feature maps, each with the curriculum's probability at this step; the
correlation and CVLearner of `CVNet.verification_logits` score the pair. The pairs come from
`rerank_dataset` below (positives: same landmark; negatives: hard ones from the cvnet_global
descriptor bank with the curriculum's ratio, else random). The bank is the frozen backbone's
global descriptor of every training image, searched exactly by the retrieval engine
(`scvnet_jax.engine`) for each image's most similar images of other landmarks.

The frozen backbone lives in the train state (so a checkpoint is self-contained) but is never
touched by the optimizer; the state's head is exactly the `conv2ds_0..2` and `cv_learner`
subtrees of an official checkpoint.

This module holds the whole stage: state and step, Hide-and-Seek, the pair stream and its
curriculum, the descriptor bank, and the `Task` the training loop runs.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import flax
import grain
import jax
import jax.numpy as jnp
import cv2
import numpy as np
import optax

from scvnet_jax import files, mesh as mesh_lib
from scvnet_jax.api import RetrievalModel
from scvnet_jax.data.augment import Augment, augment
from scvnet_jax.data.sources import Records, TrainingSet, process_batches
from scvnet_jax.engine import search
from scvnet_jax.errors import ConfigError
from scvnet_jax.images import normalize as normalize_host
from scvnet_jax.models.cvnet import CORR_SCALES, CVNet
from scvnet_jax.training import optim, stage1
from scvnet_jax.training.config import arch_of, dtype_of
from scvnet_jax.training.loop import (Task as _Task, all_finite, host, read_init_from,
                                     with_position)

HEAD = tuple(f"conv2ds_{i}" for i in range(len(CORR_SCALES))) + ("cv_learner",)


@flax.struct.dataclass
class RerankState:
    step: jax.Array
    params: Any         # {'conv2ds_0', 'conv2ds_1', 'conv2ds_2', 'cv_learner'}: trained
    opt_state: Any
    backbone: Any       # {'params', 'batch_stats'} of encoder_q: frozen


def model(cfg) -> CVNet:
    return CVNet(arch_of(cfg), dtype=dtype_of(cfg), precision=cfg.model.precision or None)


def variables(state_or_backbone, head=None) -> dict:
    """The CVNet variables of (frozen backbone, head) for `model(cfg).apply`."""
    if isinstance(state_or_backbone, RerankState):
        backbone, head = state_or_backbone.backbone, state_or_backbone.params
    else:
        backbone = state_or_backbone
    return {"params": {"encoder_q": backbone["params"], **(head or {})},
            "batch_stats": {"encoder_q": backbone["batch_stats"]}}


def init_state(cfg, rng, checkpoint_variables) -> RerankState:
    """A fresh state from CVNet variables (the cvnet_global model or an official checkpoint):
    backbone from them; head random, or theirs when cfg.rerank.head_init == 'checkpoint'."""
    p = checkpoint_variables["params"]
    backbone = {"params": p["encoder_q"],
                "batch_stats": checkpoint_variables["batch_stats"]["encoder_q"]}
    if cfg.rerank.head_init == "checkpoint":
        head = {k: p[k] for k in HEAD}
    else:   # initialises only the head: verification_logits touches nothing else
        f = jnp.zeros((1, 8, 8, 16 * cfg.model.width), jnp.float32)
        head = model(cfg).init(rng, f, f, method=CVNet.verification_logits)["params"]
    return RerankState(step=jnp.zeros((), jnp.int32), params=head,
                       opt_state=optim.optimizer(cfg).init(head), backbone=backbone)


def hide_and_seek(f, prob, rng, cell: int = 1):
    """Zeroes each `cell` x `cell` block of feature cells of each map of f (B, h, w, C)
    independently with probability `prob` (Hide-and-Seek on feature maps)."""
    b, h, w, _ = f.shape
    gh, gw = -(-h // cell), -(-w // cell)
    keep = jax.random.uniform(rng, (b, gh, gw)) >= prob
    keep = jnp.repeat(jnp.repeat(keep, cell, axis=1), cell, axis=2)[:, :h, :w]
    return f * keep[..., None].astype(f.dtype)


def linear_ramp(start: float, end: float, steps: int, step) -> float:
    """start -> end linearly over `steps` steps, then end (the curricula)."""
    frac = min(max(float(step) / steps, 0.0), 1.0) if steps > 0 else 1.0
    return float(start + (end - start) * frac)


def curriculum_steps(cfg) -> int:
    """Length of both curriculum ramps (hard-negative ratio, Hide-and-Seek probability)."""
    return int(cfg.rerank.curriculum_steps or cfg.total_steps)


def make_train_step(cfg) -> Callable[[RerankState, dict], tuple[RerankState, dict]]:
    """The pure step (state, batch) -> (state, metrics); batch = {'query', 'candidate':
    uint8 (B, S, S, 3), 'label': int32 (B,) 1 = same landmark, 'hard': bool (B,)}."""
    net = model(cfg)
    tx = optim.optimizer(cfg)
    lr = optim.learning_rate(cfg)
    dtype = dtype_of(cfg)
    r = cfg.rerank
    n_ramp = curriculum_steps(cfg)
    h0, h1 = (float(v) for v in r.hide_prob)
    base_key = jax.random.PRNGKey(int(cfg.seed) + 1)

    def step(state: RerankState, batch: dict):
        b = batch["query"].shape[0]
        x = stage1.normalize(jnp.concatenate([batch["query"], batch["candidate"]]), dtype)
        feats = net.apply(variables(state.backbone), x, method=CVNet.local_features)
        feats = jax.lax.stop_gradient(feats.astype(jnp.float32))
        frac = jnp.clip(state.step.astype(jnp.float32) / max(n_ramp, 1), 0.0, 1.0)
        hide = h0 + (h1 - h0) * frac
        feats = hide_and_seek(feats, hide, jax.random.fold_in(base_key, state.step),
                              int(r.hide_cell))
        fq, fk = feats[:b], feats[b:]
        y = batch["label"].astype(jnp.int32)

        def loss_fn(head):
            logits = net.apply(variables(state.backbone, head), fq, fk,
                               method=CVNet.verification_logits).astype(jnp.float32)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        pos, hard = y == 1, batch["hard"] & (y == 0)
        neg = y == 0

        def mean_where(v, m):
            return jnp.sum(jnp.where(m, v, 0.0)) / jnp.maximum(jnp.sum(m), 1)

        metrics = {
            "loss": loss, "accuracy": correct.mean(),
            "positive_accuracy": mean_where(correct, pos),
            "negative_accuracy": mean_where(correct, neg),
            "hard_negative_accuracy": mean_where(correct, hard),
            "hard_fraction": jnp.sum(hard) / jnp.maximum(jnp.sum(neg), 1),
            "hide_prob": hide, "grad_norm": optax.global_norm(grads), "lr": lr(state.step),
            "finite": jnp.isfinite(loss) & all_finite(params)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def hard_negative_table(desc: np.ndarray, labels: np.ndarray, k: int, mesh=None,
                        max_block: int = 1 << 26) -> np.ndarray:
    """For every image, the indices of its k most similar images of *other* landmarks
    (descending similarity) -> (N, k) int32, -1 where fewer exist. Exact (the engine's
    `search.topk`, the database split over the devices)."""
    _, idx = search.topk(desc, desc, k, db_labels=labels, query_labels=labels, mesh=mesh,
                         max_block=max_block)
    return idx.astype(np.int32)


def check_config(cfg) -> None:
    """What cvnet_rerank needs beyond `config.validate` (which loop.train runs first)."""
    if not cfg.init_from:
        raise ConfigError("the cvnet_rerank stage needs --config.init_from: the cvnet_global "
                          "model directory (e.g. runs/demo/model) or an official CVNet "
                          "checkpoint")
    stage1.check_batch(cfg)
    r = cfg.rerank
    for name in ("hard_ratio", "hide_prob"):
        v = tuple(r[name])
        if len(v) != 2 or not all(0.0 <= x <= 1.0 for x in v):
            raise ConfigError(f"rerank.{name} must be (start, end) probabilities, got {v}")
    if not 0.0 <= r.positive_fraction <= 1.0:
        raise ConfigError(f"rerank.positive_fraction must be in [0, 1], got {r.positive_fraction}")


def bank_version(cfg, step: int) -> int:
    """Which descriptor bank serves `step`: refreshed every rerank.bank_refresh_steps
    (0 = built once)."""
    every = int(cfg.rerank.bank_refresh_steps)
    return int(step) // every if every > 0 else 0


# -- data ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PairSampling:
    """How cvnet_rerank draws the candidate of each query image."""
    positive_fraction: float = 0.5          # P(candidate from the same landmark)
    hard_ratio: tuple[float, float] = (0.0, 0.5)   # P(negative is hard): start -> end
    curriculum_steps: int = 1000            # length of the ramp, in steps
    global_batch: int = 1                   # pairs per step


class RerankPairTransform(Records, grain.transforms.RandomMap):
    """(stream position, index) -> {'query', 'candidate', 'label', 'hard'} for cvnet_rerank.

    label 1: the candidate is another image of the query's landmark (a second augmentation of
    the query for a single-image class); label 0: an image of another landmark, drawn from the
    query's row of the hard-negative table (its top-ranked images of other landmarks by the
    cvnet_global descriptor) with the curriculum's probability at this step, else uniformly.
    The table is read lazily from `table_path` (memory-mapped .npy, (N, K) int32, -1 = none).
    """

    def __init__(self, ts: TrainingSet, aug: Augment, sampling: PairSampling, table_path: str):
        super().__init__(ts)
        self.aug, self.sampling, self.table_path = aug, sampling, str(table_path)
        self._table = None

    def __getstate__(self):
        return {**super().__getstate__(), "_table": None}

    def _hard(self, index: int, rng: np.random.Generator) -> int | None:
        if self._table is None:
            self._table = np.load(self.table_path, mmap_mode="r")
        row = np.asarray(self._table[index])
        row = row[row >= 0]
        return int(row[rng.integers(0, len(row))]) if len(row) else None

    def _random_other_class(self, lo: int, hi: int, rng: np.random.Generator) -> int:
        n = self.ts.num_examples
        j = int(rng.integers(0, n - (hi - lo)))
        return j + (hi - lo) * (j >= lo)     # uniform over the images outside [lo, hi)

    def random_map(self, element: Any, rng: np.random.Generator) -> dict:
        position, index = (int(v) for v in element)
        s = self.sampling
        step = position // s.global_batch
        im, label = self.record(index)
        lo, hi = self.class_range(index, label)
        hard = False
        if rng.random() < s.positive_fraction:
            target = 1
            other = im if hi - lo == 1 else self.record(self.other_in(lo, hi, index, rng))[0]
        else:
            target = 0
            j = None
            if rng.random() < linear_ramp(*s.hard_ratio, s.curriculum_steps, step):
                j = self._hard(index, rng)
            hard = j is not None
            if j is None:
                j = self._random_other_class(lo, hi, rng)
            other = self.record(j)[0]
        return {"query": augment(im, self.aug, rng), "candidate": augment(other, self.aug, rng),
                "label": np.int32(target), "hard": np.bool_(hard)}


def rerank_dataset(ts: TrainingSet, aug: Augment, sampling: PairSampling, table_path, *,
                   global_batch: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> grain.MapDataset:
    """This process's part of the batched, shuffled, repeated stream of (query, candidate)
    pairs. The element's global position in the stream gives the step (for the curriculum)
    and seeds its randomness, so a restored iterator continues the same stream, whichever
    table version it reads, for any number of processes."""
    sampling = dataclasses.replace(sampling, global_batch=global_batch)
    ds = (grain.MapDataset.range(ts.num_examples).shuffle(seed=seed).repeat(None)
          .map_with_index(with_position)
          .random_map(RerankPairTransform(ts, aug, sampling, table_path), seed=seed))
    return process_batches(ds, global_batch, process_index, process_count)


class BankTransform(Records, grain.transforms.RandomMap):
    """Index -> {'image', 'index'} for the descriptor bank: the whole image resized to size x
    size (version 0), or a random augmentation of it (later refreshes)."""

    def __init__(self, ts: TrainingSet, aug: Augment, augmented: bool):
        super().__init__(ts)
        self.aug, self.augmented = aug, augmented

    def random_map(self, index: Any, rng: np.random.Generator) -> dict:
        i = int(index)
        im, _ = self.record(i)
        if self.augmented:
            out = augment(im, self.aug, rng)
        else:
            interp = cv2.INTER_AREA if max(im.shape[:2]) > self.aug.size else cv2.INTER_LINEAR
            out = cv2.resize(im, (self.aug.size, self.aug.size), interpolation=interp)
        return {"image": np.ascontiguousarray(out), "index": np.int32(i)}


def bank_dataset(ts: TrainingSet, aug: Augment, *, version: int, batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """This process's share of the training images (every process_count-th, from
    process_index) in batches of `batch` (the last one shorter). Each image's augmentation
    is drawn from its global index, so the bank does not depend on the number of
    processes."""
    ds = grain.MapDataset.range(ts.num_examples).random_map(
        BankTransform(ts, aug, augmented=version > 0), seed=seed + 7919 * version)
    return ds[process_index::process_count].batch(batch)


# -- the task -----------------------------------------------------------------------------

class Task(_Task):
    """The cvnet_rerank stage: frozen backbone, conv2ds + CVLearner trained on pairs; hard
    negatives from a bank of the backbone's global descriptors (W/hard_negatives/)."""
    name = "cvnet_rerank (CVNet-Rerank)"
    rate = "pairs_per_sec"
    bar_keys = (("loss", "loss"), ("accuracy", "acc"), ("hard_negative_accuracy", "hard acc"),
                ("hide_prob", "hide"), ("lr", "lr"))

    def __init__(self, cfg, ts, mesh, workdir):
        super().__init__(cfg, ts, mesh, workdir)
        from scvnet_jax.models import cvnet

        self.version = None
        abstract = jax.eval_shape(lambda k, v: init_state(cfg, k, v), jax.random.PRNGKey(0),
                                  cvnet.abstract_variables(arch_of(cfg)))
        self.compile(make_train_step(cfg), lambda k, v: init_state(cfg, k, v), abstract)

    @staticmethod
    def check_config(cfg) -> None:
        check_config(cfg)

    def initial_state(self):
        _, variables = read_init_from(self.cfg)
        return self.init(jax.random.PRNGKey(self.cfg.seed), variables)

    def needs_new_iterator(self, step: int) -> bool:
        return bank_version(self.cfg, step) != self.version

    def iterator(self, step: int, state):
        cfg = self.cfg
        version = bank_version(cfg, step)
        table = self.hard_negatives(version, state)
        r = cfg.rerank
        sampling = PairSampling(positive_fraction=float(r.positive_fraction),
                                hard_ratio=tuple(r.hard_ratio),
                                curriculum_steps=curriculum_steps(cfg))
        ds = rerank_dataset(self.ts, self.augment(), sampling, table,
                            global_batch=cfg.batch_size, seed=cfg.seed,
                            process_index=jax.process_index(),
                            process_count=jax.process_count())
        self.version = version
        return self.make_iterator(ds)

    def hard_negatives(self, version: int, state) -> Path:
        """W/hard_negatives/v<version>.npy: (N, bank_k) int32, built once per version (every
        process computes its share of the descriptors, all get the table) and reused on
        resume."""
        cfg = self.cfg
        path = self.workdir / "hard_negatives" / f"v{version}.npy"
        n, k = self.ts.num_examples, int(cfg.rerank.bank_k)
        if path.is_file():
            t = np.load(path, mmap_mode="r")
            if t.shape == (n, k) and t.dtype == np.int32:
                return path
        t0 = time.perf_counter()
        desc = self.descriptor_bank(version, state)
        table = hard_negative_table(desc, self.ts.labels(), k)
        if jax.process_index() == 0:
            files.atomic_save_npy(path, table)
        mesh_lib.barrier(f"hard_negatives_v{version}")
        if jax.process_index() == 0:
            print(f"hard-negative bank v{version}: {n} descriptors, top-{k} other-landmark "
                  f"neighbours, {time.perf_counter() - t0:.1f} s")
        return path

    def descriptor_bank(self, version: int, state) -> np.ndarray:
        """The frozen backbone's global descriptor (single scale) of every training image:
        each process describes its share on its own devices, then all are gathered."""
        from tqdm import tqdm

        cfg = self.cfg
        describer = RetrievalModel(model(cfg), variables(host(state.backbone)))
        per_batch = max(1, int(cfg.rerank.bank_batch_size) // jax.process_count())
        per_batch = -(-per_batch // describer.num_devices) * describer.num_devices
        ds = bank_dataset(self.ts, self.augment(), version=version, batch=per_batch,
                          seed=cfg.seed, process_index=jax.process_index(),
                          process_count=jax.process_count())
        n = self.ts.num_examples
        rows, descs = [], []
        with tqdm(total=len(range(jax.process_index(), n, jax.process_count())), unit="img",
                  desc=f"bank v{version}", dynamic_ncols=True,
                  disable=jax.process_index() != 0) as bar:
            for b in self.make_iterator(ds):
                k = len(b["index"])      # the last batch is padded: one compiled shape
                x = np.zeros((per_batch,) + b["image"].shape[1:], np.float32)
                x[:k] = normalize_host(b["image"])
                descs.append(np.asarray(describer.global_descriptor(x))[:k])
                rows.append(b["index"])
                bar.update(k)
        out = np.zeros((n, cfg.model.reduction_dim), np.float32)
        out[mesh_lib.allgather_rows(np.concatenate(rows))] = mesh_lib.allgather_rows(
            np.concatenate(descs).astype(np.float32))
        return out

    def cvnet_variables(self, state) -> tuple[dict, str]:
        """(the CVNet variables of `state` as host arrays, where the rerank head is from)."""
        return host(variables(state)), "trained"

    def export(self, state, step: int, out: str = "model", meta: dict | None = None) -> Path:
        from scvnet_jax.convert import model_dir

        meta = {"trained_by": "scvnet_jax train.py, stage cvnet_rerank", "step": int(step),
                "backbone": f"frozen, from {self.cfg.init_from}", "data": self.cfg.data.name,
                **(meta or {})}
        return model_dir.save_model_dir(self.workdir / out, arch_of(self.cfg),
                                        self.cvnet_variables(state)[0], meta=meta,
                                        overwrite=True)
