"""Stage 2, CVNet-Rerank: the stage-1 backbone frozen, the per-scale 3x3 convs (`conv2ds_*`)
and the CVLearner trained as a binary classifier of image pairs (same landmark or not) with
cross-entropy on the verification logits.

Per step: the frozen backbone (BatchNorm in inference mode, no gradient) gives the local
features (last stage-3 block) of the query and candidate images; Hide-and-Seek zeroes random
cells of both feature maps, each with the curriculum's probability at this step; the
correlation and CVLearner of `CVNet.verification_logits` score the pair. The pairs come from
`scvnet_jax.data.training.rerank_dataset` (positives: same landmark; negatives: hard ones
from the stage-1 descriptor bank with the curriculum's ratio, else random).

The frozen backbone lives in the train state (so a checkpoint is self-contained) but is never
touched by the optimizer; the state's head is exactly the `conv2ds_0..2` and `cv_learner`
subtrees of an official checkpoint.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from scvnet_jax.models.cvnet import CORR_SCALES, CVNet
from scvnet_jax.training import stage1

HEAD = tuple(f"conv2ds_{i}" for i in range(len(CORR_SCALES))) + ("cv_learner",)


@flax.struct.dataclass
class RerankState:
    step: jax.Array
    params: Any         # {'conv2ds_0', 'conv2ds_1', 'conv2ds_2', 'cv_learner'}: trained
    opt_state: Any
    backbone: Any       # {'params', 'batch_stats'} of encoder_q: frozen


def model(cfg) -> CVNet:
    m = cfg.model
    return CVNet(depth=m.depth, width=m.width, reduction_dim=m.reduction_dim,
                 corr_dim=m.corr_dim, dtype=stage1.dtype_of(m.dtype),
                 precision=m.precision or None)


def variables(state_or_backbone, head=None) -> dict:
    """The CVNet variables of (frozen backbone, head) for `model(cfg).apply`."""
    if isinstance(state_or_backbone, RerankState):
        backbone, head = state_or_backbone.backbone, state_or_backbone.params
    else:
        backbone = state_or_backbone
    return {"params": {"encoder_q": backbone["params"], **(head or {})},
            "batch_stats": {"encoder_q": backbone["batch_stats"]}}


def init_state(cfg, rng, checkpoint_variables) -> RerankState:
    """A fresh state from CVNet variables (the stage-1 model or an official checkpoint):
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
                       opt_state=stage1.optimizer(cfg).init(head), backbone=backbone)


def hide_and_seek(f, prob, rng, cell: int = 1):
    """Zeroes each `cell` x `cell` block of feature cells of each map of f (B, h, w, C)
    independently with probability `prob` (Hide-and-Seek on feature maps)."""
    b, h, w, _ = f.shape
    gh, gw = -(-h // cell), -(-w // cell)
    keep = jax.random.uniform(rng, (b, gh, gw)) >= prob
    keep = jnp.repeat(jnp.repeat(keep, cell, axis=1), cell, axis=2)[:, :h, :w]
    return f * keep[..., None].astype(f.dtype)


def curriculum_steps(cfg) -> int:
    """Length of both curriculum ramps (hard-negative ratio, Hide-and-Seek probability)."""
    return int(cfg.rerank.curriculum_steps or cfg.total_steps)


def make_train_step(cfg) -> Callable[[RerankState, dict], tuple[RerankState, dict]]:
    """The pure step (state, batch) -> (state, metrics); batch = {'query', 'candidate':
    uint8 (B, S, S, 3), 'label': int32 (B,) 1 = same landmark, 'hard': bool (B,)}."""
    net = model(cfg)
    tx = stage1.optimizer(cfg)
    lr = stage1.learning_rate(cfg)
    dtype = stage1.dtype_of(cfg.model.dtype)
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
            "finite": jnp.isfinite(loss) & stage1._all_finite(params)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def make_descriptor_fn(cfg) -> Callable:
    """(backbone, uint8 images (B, S, S, 3)) -> L2-normalised global descriptors (B, D):
    the frozen stage-1 descriptor, single scale (for the hard-negative bank)."""
    net = model(cfg)
    dtype = stage1.dtype_of(cfg.model.dtype)

    def describe(backbone, images):
        x = stage1.normalize(images, dtype)
        return net.apply(variables(backbone), x, method=CVNet.global_descriptor).astype(
            jnp.float32)

    return describe


def hard_negative_table(desc: np.ndarray, labels: np.ndarray, k: int,
                        max_block: int = 1 << 26) -> np.ndarray:
    """For every image, the indices of its k most similar images of *other* landmarks
    (descending similarity) -> (N, k) int32, -1 where fewer exist. Exact, on the default
    device, in query blocks of at most `max_block` similarities."""
    n = desc.shape[0]
    k_eff = min(k, n)
    rows = max(1, min(n, max_block // max(n, 1)))
    X = jnp.asarray(desc, jnp.float32)
    L = jnp.asarray(labels, jnp.int32)

    @jax.jit
    def block(q, ql):
        sim = jnp.matmul(q, X.T, precision="highest")
        sim = jnp.where(ql[:, None] == L[None, :], -jnp.inf, sim)
        vals, idx = jax.lax.top_k(sim, k_eff)
        return jnp.where(jnp.isfinite(vals), idx, -1)

    out = np.full((n, k), -1, np.int32)
    for s in range(0, n, rows):
        q, ql = desc[s:s + rows], labels[s:s + rows]
        pad = rows - len(q)          # one compiled shape for every block
        if pad:
            q = np.concatenate([q, np.zeros((pad, desc.shape[1]), desc.dtype)])
            ql = np.concatenate([ql, np.full(pad, -1, labels.dtype)])
        out[s:s + rows - pad, :k_eff] = np.asarray(block(q, ql))[:rows - pad]
    return out


def check_config(cfg) -> None:
    if not cfg.init_from:
        raise ValueError("stage 2 needs --config.init_from: the stage-1 model directory "
                         "(e.g. runs/demo/model) or an official CVNet checkpoint")
    if cfg.batch_size % jax.device_count():
        raise ValueError(f"batch_size {cfg.batch_size} (global) is not divisible by the "
                         f"{jax.device_count()} devices")
    r = cfg.rerank
    if r.head_init not in ("random", "checkpoint"):
        raise ValueError(f"rerank.head_init must be 'random' or 'checkpoint', got "
                         f"{r.head_init!r}")
    for name in ("hard_ratio", "hide_prob"):
        v = tuple(r[name])
        if len(v) != 2 or not all(0.0 <= x <= 1.0 for x in v):
            raise ValueError(f"rerank.{name} must be (start, end) probabilities, got {v}")
    if not 0.0 <= r.positive_fraction <= 1.0:
        raise ValueError(f"rerank.positive_fraction must be in [0, 1], got {r.positive_fraction}")
    if r.bank_k < 1:
        raise ValueError(f"rerank.bank_k must be >= 1, got {r.bank_k}")
    if cfg.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype must be float32 or bfloat16, got {cfg.model.dtype!r}")


def bank_version(cfg, step: int) -> int:
    """Which descriptor bank serves `step`: refreshed every rerank.bank_refresh_steps
    (0 = built once)."""
    every = int(cfg.rerank.bank_refresh_steps)
    return int(step) // every if every > 0 else 0
