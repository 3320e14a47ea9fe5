"""Stage 1, CVNet-Global: the encoder (ResNet + GeM + FC, the `encoder_q` of CVNet) trained
with lambda_cls x CurricularFace + lambda_con x momentum contrastive loss.

The momentum encoder is an exponential moving average of the encoder's parameters (never
touched by the gradient): before each step, momentum = m * momentum + (1 - m) * encoder
(MoCo's order). It embeds each image's positive; the keys join a FIFO queue of
`queue_size` descriptors and labels.

BatchNorm statistics are *global*: the batch axis is sharded over the mesh and the step is
one jitted program, so BatchNorm's batch mean and variance are reductions over the whole
global batch (XLA inserts the cross-device all-reduce: 2 x channels floats per layer).
That makes a step independent of the number of devices (tests/test_train.py checks 8
devices against 1) and keeps statistics sound when a 512x512 batch leaves only a few
images per device. The momentum encoder also runs BatchNorm in training mode on its own
batch, and keeps its own running averages.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from scvnet_jax.data import MEAN_BGR, STD_BGR
from scvnet_jax.models import ops
from scvnet_jax.models.resnet import ResNet
from scvnet_jax.training import losses


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any                 # {'encoder': ResNet params, 'classifier': {'kernel': (D, C)}}
    batch_stats: Any
    momentum_params: Any        # EMA of params['encoder']
    momentum_batch_stats: Any
    opt_state: Any
    queue: jax.Array            # (Q, D) momentum descriptors, float32
    queue_labels: jax.Array     # (Q,) int32, -1 = empty
    queue_ptr: jax.Array        # () int32, next slot
    curricular_t: jax.Array     # () float32


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def encoder(cfg) -> ResNet:
    m = cfg.model
    return ResNet(depth=m.depth, width=m.width, reduction_dim=m.reduction_dim,
                  dtype=dtype_of(m.dtype), precision=m.precision or None)


def learning_rate(cfg) -> optax.Schedule:
    o = cfg.optimizer
    warm = int(o.warmup_steps)
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, o.lr, warm, max(cfg.total_steps, warm + 1), o.lr * o.final_lr_fraction)
    if o.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, o.lr, max(warm, 1)),
                                     optax.constant_schedule(o.lr)], [warm])
    raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got {o.schedule!r}")


def _decay_mask(params):
    """Weight decay on conv/dense kernels only (not BatchNorm, biases or GeM p)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def optimizer(cfg) -> optax.GradientTransformation:
    o = cfg.optimizer
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm else []
    lr = learning_rate(cfg)
    if o.name == "sgd":
        if o.weight_decay:
            parts.append(optax.add_decayed_weights(o.weight_decay, _decay_mask))
        parts.append(optax.sgd(lr, momentum=o.momentum or None, nesterov=o.nesterov))
    elif o.name == "adamw":
        parts.append(optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                                 mask=_decay_mask))
    else:
        raise ValueError(f"optimizer.name must be 'sgd' or 'adamw', got {o.name!r}")
    return optax.chain(*parts)


def init_state(cfg, num_classes: int, rng, encoder_variables=None) -> TrainState:
    """A fresh state; `encoder_variables` ({'params', 'batch_stats'} of a ResNet, e.g. from an
    official checkpoint) replaces the random encoder."""
    k_enc, k_cls = jax.random.split(rng)
    variables = encoder_variables
    if variables is None:
        s = cfg.data.image_size
        variables = encoder(cfg).init(k_enc, jnp.zeros((1, s, s, 3), jnp.float32))
    d = cfg.model.reduction_dim
    kernel = 0.01 * jax.random.normal(k_cls, (d, num_classes), jnp.float32)
    params = {"encoder": variables["params"], "classifier": {"kernel": kernel}}
    q = cfg.loss.queue_size
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
        momentum_params=jax.tree.map(jnp.copy, variables["params"]),
        momentum_batch_stats=jax.tree.map(jnp.copy, variables["batch_stats"]),
        opt_state=optimizer(cfg).init(params),
        queue=jnp.zeros((q, d), jnp.float32), queue_labels=jnp.full((q,), -1, jnp.int32),
        queue_ptr=jnp.zeros((), jnp.int32), curricular_t=jnp.zeros((), jnp.float32))


def normalize(images_u8, dtype):
    """uint8 BGR (B, H, W, 3) -> the official normalisation, on the accelerator."""
    x = images_u8.astype(jnp.float32) / 255.0
    return ((x - MEAN_BGR) / STD_BGR).astype(dtype)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def make_train_step(cfg) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure step (state, batch) -> (state, metrics); batch = {'image', 'positive': uint8
    (B, S, S, 3), 'label': int32 (B,)} with B the global batch."""
    model = encoder(cfg)
    tx = optimizer(cfg)
    lr = learning_rate(cfg)
    L = cfg.loss
    dtype = dtype_of(cfg.model.dtype)
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
            l_cls, t_new, acc = losses.curricular_face(
                q, params["classifier"]["kernel"], y, state.curricular_t,
                scale=L.cls_scale, margin=L.cls_margin)
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
                   "lr": lr(state.step), "finite": jnp.isfinite(loss) & _all_finite(params)}
        return new, metrics

    return step


def check_config(cfg) -> None:
    """Config errors that would otherwise surface as shape errors deep inside jit."""
    q, b = cfg.loss.queue_size, cfg.batch_size
    if q % b:
        raise ValueError(f"loss.queue_size ({q}) must be a multiple of batch_size ({b}): the "
                         "queue takes whole batches")
    if cfg.batch_size % jax.device_count():
        raise ValueError(f"batch_size {cfg.batch_size} (global) is not divisible by the "
                         f"{jax.device_count()} devices")
    if cfg.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype must be float32 or bfloat16, got {cfg.model.dtype!r}")


def export_variables(state: TrainState, which: str = "encoder") -> dict:
    """{'params', 'batch_stats'} of the trained encoder ('encoder') or the momentum encoder
    ('momentum'), as host NumPy arrays."""
    if which == "encoder":
        v = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
    elif which == "momentum":
        v = {"params": state.momentum_params, "batch_stats": state.momentum_batch_stats}
    else:
        raise ValueError(f"export must be 'encoder' or 'momentum', got {which!r}")
    return jax.tree.map(np.asarray, jax.device_get(v))

