"""cvnet_global's losses: CurricularFace classification and the momentum contrastive loss.

All inputs are L2-normalised descriptors. Under `jax.jit` with a sharded batch, every mean
over the batch is a mean over the global batch, so the losses do not depend on how the
batch is split across devices.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

T_MOMENTUM = 0.01  # CurricularFace's running-average rate of t (Huang et al. 2020)


def curricular_face(q, kernel, labels, t, *, scale: float, margin: float,
                    num_classes: int | None = None, logits_sharding=None):
    """CurricularFace (Huang et al., CVPR 2020) on unit descriptors q (B, D) and class
    weights `kernel` (D, C), normalised here per class.

    Returns (loss, new t, top-1 accuracy of the unmargined cosines). `t` is the running mean
    of the target cosine (no gradient); negatives harder than the margined target get
    cos * (t + cos), so they count more as training advances.

    `num_classes` < C: the kernel is padded (columns split evenly over a device mesh); the
    logits of columns >= num_classes are -inf in the loss and the accuracy's argmax, so the
    loss is the unpadded one and those columns get zero gradient (they must not be zero
    vectors: the column norm's gradient at zero is NaN). `logits_sharding` (e.g. columns
    over the mesh, like the kernel): where the (B, C) cosines are computed, so that the
    descriptors are gathered to the kernel's shards rather than the kernel to every device.
    """
    c = kernel.shape[1]
    w = kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True).clip(1e-12)
    cos = jnp.clip(q.astype(jnp.float32) @ w.astype(jnp.float32), -1.0, 1.0)
    if logits_sharding is not None:
        cos = jax.lax.with_sharding_constraint(cos, logits_sharding)
    real = None if num_classes is None or num_classes == c else jnp.arange(c) < num_classes
    target = jnp.take_along_axis(cos, labels[:, None], axis=1)             # (B, 1)
    sin = jnp.sqrt(jnp.clip(1.0 - target ** 2, 0.0, 1.0))
    cos_m = target * math.cos(margin) - sin * math.sin(margin)             # cos(theta + m)
    final_target = jnp.where(target > math.cos(math.pi - margin), cos_m,
                             target - math.sin(math.pi - margin) * margin)
    t_new = jax.lax.stop_gradient(T_MOMENTUM * jnp.mean(target) + (1 - T_MOMENTUM) * t)
    hard = cos > cos_m
    cos = jnp.where(hard, cos * (t_new + cos), cos)
    onehot = jax.nn.one_hot(labels, cos.shape[1], dtype=bool)
    logits = scale * jnp.where(onehot, final_target, cos)
    scores = w.T @ q.T.astype(jnp.float32)                                # (C, B)
    if real is not None:
        logits = jnp.where(real[None], logits, -jnp.inf)
        scores = jnp.where(real[:, None], scores, -jnp.inf)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    acc = jnp.mean(jnp.argmax(scores, axis=0) == labels)
    return loss, t_new, acc


def momentum_contrastive(q, k, labels, queue, queue_labels, *, temperature: float):
    """Supervised momentum contrast: each query q_i (B, D) against the batch's momentum keys
    k (B, D) and the FIFO queue (Q, D) of earlier keys; every key of the same label
    (queue_labels -1 = empty slot, ignored) is a positive, the rest negatives:

        L_i = - mean_{p: label_p = y_i} log softmax_j(q_i . key_j / temperature)_p
    """
    keys = jnp.concatenate([k, queue], 0).astype(jnp.float32)
    key_labels = jnp.concatenate([labels, queue_labels], 0)
    valid = key_labels >= 0
    logits = (q.astype(jnp.float32) @ keys.T) / temperature               # (B, B + Q)
    logits = jnp.where(valid[None], logits, -jnp.inf)
    log_prob = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
    pos = (key_labels[None] == labels[:, None]) & valid[None]             # own key included
    per_query = -jnp.sum(jnp.where(pos, log_prob, 0.0), 1) / jnp.sum(pos, 1)
    return per_query.mean()
