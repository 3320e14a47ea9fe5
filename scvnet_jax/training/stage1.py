"""The "cvnet_global" stage (CVNet-Global): the encoder (ResNet + GeM + FC, the `encoder_q`
of CVNet) trained with lambda_cls x CurricularFace + lambda_con x momentum contrastive loss.

The momentum encoder is an exponential moving average of the encoder's parameters (never
touched by the gradient): before each step, momentum = m * momentum + (1 - m) * encoder
(MoCo's order). It embeds each image's positive; the keys join a FIFO queue of
`queue_size` descriptors and labels.

BatchNorm statistics are *global*: the batch axis is sharded over the mesh and the step is
one jitted program, so BatchNorm's batch mean and variance are reductions over the whole
global batch (XLA inserts the cross-device all-reduce: 2 x channels floats per layer).
That makes a step independent of the number of devices (tests/training/test_stage1.py
checks 8 devices against 1, and 2 processes against 1) and keeps statistics sound when a 512x512 batch leaves only a few
images per device. The momentum encoder also runs BatchNorm in training mode on its own
batch, and keeps its own running averages.

This module holds the whole stage: train state and step, its data stream (image pairs),
and the `Task` the training loop runs (init, data, export of W/model).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from scvnet_jax import mesh as mesh_lib
from scvnet_jax.data.augment import Augment, augment
from scvnet_jax.data.sources import Records, TrainingSet, process_batches
from scvnet_jax.errors import ConfigError
from scvnet_jax.images import MEAN_BGR, STD_BGR
from scvnet_jax.models import ops
from scvnet_jax.models.resnet import ResNet
from scvnet_jax.training import losses, optim
from scvnet_jax.training.config import arch_of, dtype_of
from scvnet_jax.training.loop import Task as _Task, all_finite, host, read_init_from


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any                 # {'encoder': ResNet params, 'classifier': {'kernel': (D, C')}}
    batch_stats: Any
    momentum_params: Any        # EMA of params['encoder']
    momentum_batch_stats: Any
    opt_state: Any
    queue: jax.Array            # (Q, D) momentum descriptors, float32
    queue_labels: jax.Array     # (Q,) int32, -1 = empty
    queue_ptr: jax.Array        # () int32, next slot
    curricular_t: jax.Array     # () float32


def encoder(cfg) -> ResNet:
    a = arch_of(cfg)
    return ResNet(depth=a.depth, width=a.width, reduction_dim=a.reduction_dim,
                  dtype=dtype_of(cfg), precision=cfg.model.precision or None)


def classifier_kernel(key, dim: int, num_classes: int, columns: int | None = None):
    """The initial (dim, columns) classifier: N(0, 0.01^2) columns for the classes (from
    `key`, as without padding), then columns - num_classes padding columns, also random
    (from another key; a zero column would make the column norm's gradient NaN)."""
    kernel = 0.01 * jax.random.normal(key, (dim, num_classes), jnp.float32)
    extra = (columns or num_classes) - num_classes
    if extra > 0:
        pad = 0.01 * jax.random.normal(jax.random.fold_in(key, 1), (dim, extra), jnp.float32)
        kernel = jnp.concatenate([kernel, pad], axis=1)
    return kernel


def init_state(cfg, num_classes: int, rng, encoder_variables=None, *,
               columns: int | None = None) -> TrainState:
    """A fresh state; `encoder_variables` ({'params', 'batch_stats'} of a ResNet, e.g. from an
    official checkpoint) replaces the random encoder. `columns` >= num_classes: the
    classifier's width, padded to split evenly over a mesh (`mesh.padded_columns`; the
    loss masks the padding out); default num_classes."""
    k_enc, k_cls = jax.random.split(rng)
    variables = encoder_variables
    if variables is None:
        s = cfg.data.image_size
        variables = encoder(cfg).init(k_enc, jnp.zeros((1, s, s, 3), jnp.float32))
    d = cfg.model.reduction_dim
    kernel = classifier_kernel(k_cls, d, num_classes, columns)
    params = {"encoder": variables["params"], "classifier": {"kernel": kernel}}
    q = cfg.loss.queue_size
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
        momentum_params=jax.tree.map(jnp.copy, variables["params"]),
        momentum_batch_stats=jax.tree.map(jnp.copy, variables["batch_stats"]),
        opt_state=optim.optimizer(cfg).init(params),
        queue=jnp.zeros((q, d), jnp.float32), queue_labels=jnp.full((q,), -1, jnp.int32),
        queue_ptr=jnp.zeros((), jnp.int32), curricular_t=jnp.zeros((), jnp.float32))


def normalize(images_u8, dtype):
    """uint8 BGR (B, H, W, 3) -> the official normalisation, on the accelerator."""
    x = images_u8.astype(jnp.float32) / 255.0
    return ((x - MEAN_BGR) / STD_BGR).astype(dtype)


def make_train_step(cfg, num_classes: int | None = None, mesh=None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure step (state, batch) -> (state, metrics); batch = {'image', 'positive': uint8
    (B, S, S, 3), 'label': int32 (B,)} with B the global batch. `num_classes`: the real
    number of classes when the classifier has padding columns (masked out of the loss).
    `mesh` (several devices, the classifier's columns split over them): the cosines are
    computed column-split too, from the gathered (B, D) descriptors, instead of gathering
    the whole classifier onto every device."""
    model = encoder(cfg)
    n_dev = mesh.devices.size if mesh is not None else 1
    cols_sh = mesh_lib.columns_sharding(mesh) if n_dev > 1 else None
    tx = optim.optimizer(cfg)
    lr = optim.learning_rate(cfg)
    L = cfg.loss
    dtype = dtype_of(cfg)
    m = float(L.momentum)

    def step(state: TrainState, batch: dict):
        x = normalize(batch["image"], dtype)
        xp = normalize(batch["positive"], dtype)
        y = batch["label"].astype(jnp.int32)
        mom = jax.tree.map(lambda a, b: m * a + (1 - m) * b, state.momentum_params,
                           state.params["encoder"])
        k, mom_vars = model.apply({"params": mom, "batch_stats": state.momentum_batch_stats},
                                  xp, train=True, mutable=["batch_stats"])
        k = jax.lax.stop_gradient(ops.l2_normalize(k.astype(jnp.float32)))

        def loss_fn(params):
            d, new_vars = model.apply({"params": params["encoder"],
                                       "batch_stats": state.batch_stats},
                                      x, train=True, mutable=["batch_stats"])
            q = ops.l2_normalize(d.astype(jnp.float32))
            kernel = params["classifier"]["kernel"]
            split = cols_sh is not None and kernel.shape[1] % n_dev == 0
            l_cls, t_new, acc = losses.curricular_face(
                q, kernel, y, state.curricular_t, scale=L.cls_scale, margin=L.cls_margin,
                num_classes=num_classes, logits_sharding=cols_sh if split else None)
            l_con = losses.momentum_contrastive(q, k, y, state.queue, state.queue_labels,
                                                temperature=L.temperature)
            loss = L.lambda_cls * l_cls + L.lambda_con * l_con
            return loss, (new_vars["batch_stats"], l_cls, l_con, t_new, acc)

        (loss, (bstats, l_cls, l_con, t_new, acc)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        b = k.shape[0]
        queue = jax.lax.dynamic_update_slice(state.queue, k, (state.queue_ptr, 0))
        queue_labels = jax.lax.dynamic_update_slice(state.queue_labels, y, (state.queue_ptr,))
        new = state.replace(
            step=state.step + 1, params=params, batch_stats=bstats, momentum_params=mom,
            momentum_batch_stats=mom_vars["batch_stats"], opt_state=opt_state, queue=queue,
            queue_labels=queue_labels, queue_ptr=(state.queue_ptr + b) % state.queue.shape[0],
            curricular_t=t_new)
        metrics = {"loss": loss, "loss_cls": l_cls, "loss_con": l_con, "accuracy": acc,
                   "curricular_t": t_new, "grad_norm": optax.global_norm(grads),
                   "lr": lr(state.step), "finite": jnp.isfinite(loss) & all_finite(params)}
        return new, metrics

    return step


def export_variables(state: TrainState, which: str = "encoder") -> dict:
    """{'params', 'batch_stats'} of the trained encoder ('encoder') or the momentum encoder
    ('momentum'), as host NumPy arrays."""
    if which == "encoder":
        v = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
    elif which == "momentum":
        v = {"params": state.momentum_params, "batch_stats": state.momentum_batch_stats}
    else:
        raise ConfigError(f"export must be 'encoder' or 'momentum', got {which!r}")
    return host(v)


def encoder_init(cfg) -> dict | None:
    """The encoder variables of cfg.init_from (official checkpoint or model directory; its
    depth, width and descriptor size must match cfg.model), or None: random init."""
    if not cfg.init_from:
        return None
    _, variables = read_init_from(cfg, ("depth", "width", "reduction_dim"))
    return {c: variables[c]["encoder_q"] for c in ("params", "batch_stats")}


# -- data ---------------------------------------------------------------------------------

class PairTransform(Records, grain.transforms.RandomMap):
    """Stream index -> {'image', 'positive', 'label'}: two augmented crops, the positive from
    another image of the same class (uniformly drawn; the image itself for a single-image
    class) or, with positive='same_image', a second augmentation of the same image."""

    def __init__(self, ts: TrainingSet, aug: Augment, positive: str = "same_class"):
        if positive not in ("same_class", "same_image"):
            raise ConfigError(f"data.positive must be 'same_class' or 'same_image', got "
                              f"{positive!r}")
        super().__init__(ts)
        self.aug, self.positive = aug, positive

    def random_map(self, index: Any, rng: np.random.Generator) -> dict:
        im, label = self.record(index)
        lo, hi = self.class_range(index, label)
        if self.positive == "same_class" and hi - lo > 1:
            pos, _ = self.record(self.other_in(lo, hi, index, rng))
        else:
            pos = im
        return {"image": augment(im, self.aug, rng), "positive": augment(pos, self.aug, rng),
                "label": np.int32(label)}


def dataset(ts: TrainingSet, aug: Augment, *, global_batch: int, seed: int,
            positive: str = "same_class", process_index: int = 0, process_count: int = 1,
            num_epochs: int | None = None) -> grain.MapDataset:
    """This process's part of the batched, shuffled (a new permutation every epoch),
    repeated stream of pairs. Everything random comes from grain's per-element generator,
    seeded by the config seed and the element's global position, so the stream is the same
    on every run and for any number of processes, and a restored iterator continues it."""
    ds = (grain.MapDataset.range(ts.num_examples).shuffle(seed=seed).repeat(num_epochs)
          .random_map(PairTransform(ts, aug, positive), seed=seed))
    return process_batches(ds, global_batch, process_index, process_count)


# -- the task -----------------------------------------------------------------------------

class Task(_Task):
    """The cvnet_global stage: encoder + CurricularFace + momentum contrastive loss."""
    name = "cvnet_global (CVNet-Global)"
    rate = "images_per_sec"
    bar_keys = (("loss", "loss"), ("loss_cls", "cls"), ("loss_con", "con"), ("lr", "lr"))

    def __init__(self, cfg, ts, mesh, workdir, *, split_classifier: bool = True):
        """split_classifier (default): on several devices the classifier gets
        `mesh.padded_columns` columns, split over the mesh with their optimiser state;
        False: replicated, num_classes columns (for comparison: benchmarks/train_step.py)."""
        super().__init__(cfg, ts, mesh, workdir)
        n = ts.num_classes
        cols = mesh_lib.padded_columns(n, mesh.devices.size) if split_classifier else n
        self.columns = cols
        abstract = jax.eval_shape(lambda k: init_state(cfg, n, k, columns=cols),
                                  jax.random.PRNGKey(0))
        self.compile(make_train_step(cfg, n, mesh if split_classifier else None),
                     lambda k, enc: init_state(cfg, n, k, enc, columns=cols), abstract,
                     split_columns=("classifier",) if split_classifier else ())

    @staticmethod
    def check_config(cfg) -> None:
        check_config(cfg)

    def initial_state(self):
        return self.init(jax.random.PRNGKey(self.cfg.seed), encoder_init(self.cfg))

    def iterator(self, step: int, state):
        cfg = self.cfg
        return self.make_iterator(dataset(
            self.ts, self.augment(), global_batch=cfg.batch_size, seed=cfg.seed,
            positive=cfg.data.positive, process_index=jax.process_index(),
            process_count=jax.process_count()))

    def cvnet_variables(self, state) -> tuple[dict, str]:
        """(the CVNet variables of `state` as host arrays, where the rerank head is from)."""
        if getattr(self, "_base", None) is None:
            self._base = base_variables(self.cfg)
        return cvnet_variables(self.cfg, export_variables(state, self.cfg.export), self._base)

    def export(self, state, step: int, out: str = "model", meta: dict | None = None) -> Path:
        """W/model (or W/`out`): a model directory eval.py and scvnet_jax.load read (the
        trained encoder; the rerank head comes from init_from if it has the same
        architecture, else it is randomly initialised)."""
        from scvnet_jax.convert import model_dir

        cfg = self.cfg
        variables, head = self.cvnet_variables(state)
        meta = {"trained_by": "scvnet_jax train.py, stage cvnet_global", "step": int(step),
                "export": cfg.export, "data": cfg.data.name, "rerank_head": head,
                **(meta or {})}
        return model_dir.save_model_dir(self.workdir / out, arch_of(cfg), variables,
                                        meta=meta, overwrite=True)


def base_variables(cfg) -> tuple[dict, str]:
    """(the CVNet variables cvnet_global's encoder goes into, where its rerank head is from):
    init_from's when it has the same architecture (and is there), else random."""
    from scvnet_jax.convert import read_checkpoint
    from scvnet_jax.models import cvnet

    arch = arch_of(cfg)
    if cfg.init_from and Path(cfg.init_from).expanduser().exists():
        a, v = read_checkpoint(cfg.init_from)
        if a == arch:
            return v, f"from {cfg.init_from}"
    return host(cvnet.init(arch, cfg.seed)), "random (untrained)"


def cvnet_variables(cfg, encoder_variables: dict, base=None) -> tuple[dict, str]:
    """(CVNet variables: `base_variables` with the encoder replaced, where the head is from)."""
    base, head = base or base_variables(cfg)
    return ({c: {**base[c], "encoder_q": encoder_variables[c]}
             for c in ("params", "batch_stats")}, head)


def check_config(cfg) -> None:
    """What cvnet_global needs beyond `config.validate` (ranges, choices, queue/batch, which
    loop.train runs first): a global batch that splits over this run's devices."""
    check_batch(cfg)


def check_batch(cfg) -> None:
    if cfg.batch_size <= 0 or cfg.batch_size % jax.device_count():
        raise ConfigError(f"batch_size {cfg.batch_size} (global) must be a positive multiple "
                          f"of the {jax.device_count()} devices")


