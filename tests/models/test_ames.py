"""models/ames.py's attention computes only the blocks the official masks leave open: the
same outputs as the official dense formulation (a full (N, N) softmax with sa_mask / ca_mask
and the key padding), on shapes and paddings the parity fixtures do not have. The whole
model against the official code: tests/rerank/test_ames.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scvnet_jax.models.ames import MultiheadAttention, key_sets


def official_masks(q_len: int, t_len: int):
    """The official AMES.forward's sa_mask and ca_mask (True = blocked), written as there."""
    n = 1 + q_len + t_len
    sa = np.zeros((n, n), bool)
    sa[1:q_len + 1, q_len + 1:] = True
    sa[q_len + 1:, 1:q_len + 1] = True
    ca = np.zeros((n, n), bool)
    ca[1:q_len + 1, 1:q_len + 1] = True
    ca[q_len + 1:, q_len + 1:] = True
    return sa, ca


def dense_attention(params, x, blocked, nhead):
    """nn.MultiheadAttention with a full (B, N, N) boolean mask, in NumPy float64."""
    x = np.asarray(x, np.float64)
    w, b = np.asarray(params["in_proj_weight"]), np.asarray(params["in_proj_bias"])
    bsz, n, d = x.shape
    c = d // nhead
    qkv = x @ w.T + b
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(bsz, n, nhead, c) for i in range(3))
    logits = np.einsum("bnhc,bmhc->bhnm", q / np.sqrt(c), k)
    logits = np.where(blocked[:, None], -np.inf, logits)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhnm,bmhc->bnhc", p, v).reshape(bsz, n, d)
    o = params["out_proj"]
    return out @ np.asarray(o["kernel"]) + np.asarray(o["bias"])


@pytest.mark.parametrize("q_len,t_len,dim,nhead", [(7, 3, 8, 2), (4, 9, 12, 3), (1, 1, 4, 1)])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_block_attention_is_the_official_masked_attention(q_len, t_len, dim, nhead, kind):
    rng = np.random.default_rng(q_len * 100 + t_len)
    n, bsz = 1 + q_len + t_len, 4
    x = rng.normal(size=(bsz, n, dim)).astype(np.float32)
    pad = rng.random((bsz, n)) < 0.3
    pad[:, 0] = False                   # the matching token is never padding
    pad[1, 1:1 + q_len] = True          # a query with every token padded
    pad[2, 1 + q_len:] = True           # a database image with every token padded
    mha = MultiheadAttention(dim, nhead)
    params = mha.init(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(pad), q_len,
                      kind)["params"]
    params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32),
                          params)     # non-zero biases
    got = np.asarray(mha.apply({"params": params}, jnp.asarray(x), jnp.asarray(pad), q_len,
                               kind))
    sa, ca = official_masks(q_len, t_len)
    blocked = (sa if kind == "self" else ca)[None] | pad[:, None, :]
    want = dense_attention(params, x, blocked, nhead)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_key_sets_cover_exactly_the_open_entries():
    q_len, t_len = 5, 3
    n = 1 + q_len + t_len
    for kind, mask in zip(("self", "cross"), official_masks(q_len, t_len)):
        open_ = np.zeros((n, n), bool)
        for rows, keys in key_sets(q_len, t_len, kind):
            for s in keys:
                assert not open_[rows, s].any()          # no key twice
                open_[rows, s] = True
        np.testing.assert_array_equal(open_, ~mask)
    with pytest.raises(ValueError):
        key_sets(q_len, t_len, "both")
