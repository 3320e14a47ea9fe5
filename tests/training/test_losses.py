"""Stage-1 losses against NumPy references written out from the papers' equations."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scvnet_jax.training import losses


# --- losses --------------------------------------------------------------------------

def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def curricular_reference(q, kernel, labels, t, s, m):
    """CurricularFace written out per sample from the paper's equations (float64)."""
    w = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    cos = np.clip(q @ w, -1, 1)
    tgt = cos[np.arange(len(labels)), labels]
    t_new = 0.01 * tgt.mean() + 0.99 * t
    total = 0.0
    for i, y in enumerate(labels):
        c = tgt[i]
        c_m = math.cos(math.acos(c) + m)
        fy = c_m if c > math.cos(math.pi - m) else c - math.sin(math.pi - m) * m
        logits = [fy if j == y else (cos[i, j] * (t_new + cos[i, j]) if cos[i, j] > c_m
                                     else cos[i, j]) for j in range(cos.shape[1])]
        logits = s * np.array(logits)
        total += -(logits[y] - np.log(np.exp(logits).sum()))
    return total / len(labels), t_new


def contrastive_reference(q, k, labels, queue, qlabels, tau):
    keys = np.concatenate([k, queue])
    kl = np.concatenate([labels, qlabels])
    total = 0.0
    for i, y in enumerate(labels):
        valid = kl >= 0
        logits = q[i] @ keys[valid].T / tau
        lse = np.log(np.exp(logits).sum())
        pos = kl[valid] == y
        total += -np.mean(logits[pos] - lse)
    return total / len(labels)


def test_losses_match_references():
    rng = np.random.default_rng(0)
    q = _unit(rng.normal(size=(6, 8)))
    kernel = rng.normal(size=(8, 5))
    labels = np.array([0, 3, 3, 1, 4, 0])
    for t in (0.0, 0.4):
        got, t_new, _ = losses.curricular_face(jnp.asarray(q, jnp.float32),
                                               jnp.asarray(kernel, jnp.float32),
                                               jnp.asarray(labels), t, scale=30.0, margin=0.15)
        want, t_want = curricular_reference(q, kernel, labels, t, 30.0, 0.15)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
        np.testing.assert_allclose(float(t_new), t_want, rtol=1e-5)
    k = _unit(rng.normal(size=(6, 8)))
    queue = _unit(rng.normal(size=(12, 8)))
    qlabels = np.array([1, 0, -1, 3, 2, 2, -1, 4, 0, 1, -1, -1])
    got = losses.momentum_contrastive(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                      jnp.asarray(labels), jnp.asarray(queue, jnp.float32),
                                      jnp.asarray(qlabels), temperature=0.1)
    np.testing.assert_allclose(float(got), contrastive_reference(q, k, labels, queue, qlabels,
                                                                 0.1), rtol=1e-5)


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
def test_curricular_gradient_ignores_t_and_is_finite():
    rng = np.random.default_rng(1)
    q = jnp.asarray(_unit(rng.normal(size=(4, 8))), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    y = jnp.array([0, 1, 2, 1])
    g = jax.grad(lambda t: losses.curricular_face(q, kernel, y, t, scale=30.0, margin=0.15)[0])(
        0.3)
    assert float(g) == 0.0  # t is a running statistic, never trained
    gk = jax.grad(lambda kk: losses.curricular_face(q, kk, y, 0.3, scale=30.0, margin=0.15)[0])(
        kernel)
    assert bool(jnp.all(jnp.isfinite(gk))) and float(jnp.abs(gk).sum()) > 0
