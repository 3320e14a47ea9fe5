"""The optimiser and learning-rate schedule of every stage (cfg.optimizer)."""
from __future__ import annotations

import jax
import optax

from scvnet_jax.errors import ConfigError


def learning_rate(cfg) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to lr * final_lr_fraction, or constant."""
    o = cfg.optimizer
    warm = int(o.warmup_steps)
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, o.lr, warm, max(cfg.total_steps, warm + 1), o.lr * o.final_lr_fraction)
    if o.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, o.lr, max(warm, 1)),
                                     optax.constant_schedule(o.lr)], [warm])
    raise ConfigError(f"optimizer.schedule must be 'cosine' or 'constant', got {o.schedule!r}")


def _decay_mask(exclude=()):
    """Weight decay on conv/dense kernels only (not BatchNorm, LayerNorm, biases or GeM p),
    and not in the submodules named in `exclude`."""
    exclude = set(exclude)

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: path[-1].key == "kernel" and not exclude & {
                str(getattr(k, "key", k)) for k in path}, params)
    return mask


def optimizer(cfg) -> optax.GradientTransformation:
    """Global-norm clipping (clip_norm > 0), then SGD (momentum, kernel-only weight decay)
    or AdamW (kernel-only decay)."""
    o = cfg.optimizer
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm else []
    lr = learning_rate(cfg)
    decay_mask = _decay_mask(o.get("decay_exclude", ()))
    if o.name == "sgd":
        if o.weight_decay:
            parts.append(optax.add_decayed_weights(o.weight_decay, decay_mask))
        parts.append(optax.sgd(lr, momentum=o.momentum or None, nesterov=o.nesterov))
    elif o.name == "adamw":
        parts.append(optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                                 mask=decay_mask))
    else:
        raise ConfigError(f"optimizer.name must be 'sgd' or 'adamw', got {o.name!r}")
    return optax.chain(*parts)
