"""AMES combined with the training-free chamfer score (not the official scoring; what a
model trained here may record): `combine`'s mix and chamfer_logit against their formulas,
the official path unchanged when both are 0, `settings_of` reading them from a model
directory's meta, and the training side's per-pair chamfer (`training.ames.pair_chamfer`)
equal to the reranker's."""
from __future__ import annotations

import numpy as np
import pytest

from scvnet_jax.errors import ConfigError, InputError
from scvnet_jax.rerank import ames, chamfer


def _shortlist(rng, K=8, nq=3):
    ranks = np.stack([rng.permutation(20)[:K] for _ in range(nq)], axis=1)
    sims = np.sort(rng.random((K, nq)).astype(np.float32), axis=0)[::-1].copy()
    logits = rng.normal(size=(K, nq)).astype(np.float32) * 3
    cham = rng.random((K, nq)).astype(np.float32)
    return ranks, sims, logits, cham


def _sorted_by(ranks, s, k):
    order = np.argsort(-s, axis=0, kind="stable")
    out = ranks.copy()
    out[:k] = np.take_along_axis(ranks[:k], order, axis=0)
    return out, np.take_along_axis(s, order, axis=0)


def test_mix_and_chamfer_logit_follow_their_formulas():
    rng = np.random.default_rng(0)
    ranks, sims, logits, cham = _shortlist(rng)
    k, lamb, temp = 6, 0.3, 0.7
    official = ames.combine(ranks, sims, logits, k=k, lamb=lamb, temp=temp)
    for got in (ames.combine(ranks, sims, logits, k=k, lamb=lamb, temp=temp, chamfer=cham),
                ames.combine(ranks, sims, logits, k=k, lamb=lamb, temp=temp, chamfer=cham,
                             mix=0.0, chamfer_logit=0.0)):
        np.testing.assert_array_equal(got[0], official[0])
        np.testing.assert_array_equal(got[1], official[1])

    def sig(x):
        return 1 / (1 + np.exp(-temp * x))
    mix, a, c = 0.4, 5.0, 0.6
    want = _sorted_by(ranks, lamb * sims[:k] + (1 - lamb) * (
        mix * cham[:k] + (1 - mix) * sig(logits[:k] + a * (cham[:k] - c))), k)
    got = ames.combine(ranks, sims, logits, k=k, lamb=lamb, temp=temp, chamfer=cham, mix=mix,
                       chamfer_logit=a, chamfer_center=c)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    # mix 1: the chamfer reranker's order
    got = ames.combine(ranks, sims, logits, k=k, lamb=lamb, temp=temp, chamfer=cham, mix=1.0)
    np.testing.assert_array_equal(got[0], chamfer.combine(ranks, sims, cham, k=k, lamb=lamb)[0])
    with pytest.raises(ConfigError, match="needs the chamfer scores"):
        ames.combine(ranks, sims, logits, k=k, mix=0.5)
    with pytest.raises(ConfigError, match="mix must be in"):
        ames.combine(ranks, sims, logits, k=k, mix=1.5, chamfer=cham)
    with pytest.raises(InputError, match="chamfer must be"):
        ames.combine(ranks, sims, logits, k=k, mix=0.5, chamfer=cham[:2])


def test_settings_of_reads_the_combination_from_the_meta():
    from scvnet_jax.models.ames import AMESArch
    arch = AMESArch(local_dim=8, model_dim=8, nhead=2, num_encoder_layers=1,
                    dim_feedforward=16)
    model = ames.AMESReranker(arch, {"params": {}})
    d = ames.settings_of(model)
    assert (d["mix"], d["chamfer_logit"], d["chamfer_center"]) == (0.0, 0.0, 0.0)
    model.meta = {"rerank": {"lamb": 0.5, "temp": 1.0, "mix": 0.25, "chamfer_logit": 10.0,
                             "chamfer_center": 0.8, "k": 50}}
    d = ames.settings_of(model)
    assert (d["lamb"], d["mix"], d["chamfer_logit"], d["chamfer_center"], d["k"]) == (
        0.5, 0.25, 10.0, 0.8, 50)


def test_training_pair_chamfer_is_the_rerankers():
    from scvnet_jax.training.ames import pair_chamfer
    rng = np.random.default_rng(3)
    q = rng.normal(size=(4, 9, 16)).astype(np.float16)
    db = rng.normal(size=(4, 1, 7, 16)).astype(np.float16)
    q_mask = np.arange(9)[None] >= rng.integers(1, 10, 4)[:, None]
    db_mask = np.arange(7)[None, None] >= rng.integers(1, 8, (4, 1))[..., None]
    want = chamfer.scores(q, q_mask, db, db_mask)[:, 0]
    got = [pair_chamfer(q[i], q_mask[i], db[i, 0], db_mask[i, 0]) for i in range(4)]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_rerank_images_combines_with_chamfer_of_the_same_descriptors(tmp_path, tiny_model,
                                                                     monkeypatch):
    """A model that records chamfer_logit (trained on top of chamfer) and a mix: the
    shortlist is sorted by `combine` of the model's logits and the chamfer scores of the
    same pairs (the query's query_len and each candidate's db_len descriptors, as chamfer
    reads them, float16); a second run reads the database from the cache (no extraction)."""
    import cv2

    from scvnet_jax.engine import local
    from scvnet_jax.images import ImageRef
    from scvnet_jax.models.ames import AMESArch, init

    rng = np.random.default_rng(0)
    paths = [str(tmp_path / f"im{i}.png") for i in range(6)]
    for p in paths:                                     # random images of 60-110 px sides
        h, w = rng.integers(60, 110, 2)
        cv2.imwrite(p, rng.integers(0, 255, (int(h), int(w), 3), dtype=np.uint8))
    queries, db = [ImageRef(paths[0]), ImageRef(paths[1])], [ImageRef(p) for p in paths[2:]]
    ranks = np.stack([rng.permutation(4), rng.permutation(4)], axis=1)
    sims = np.sort(rng.uniform(0.2, 0.9, (4, 2)).astype(np.float32), axis=0)[::-1].copy()
    arch = AMESArch(local_dim=tiny_model.arch.local_dim, model_dim=16, nhead=2,
                    num_encoder_layers=1, dim_feedforward=32)
    model = ames.AMESReranker(arch, init(arch, 1))
    model.meta = {"rerank": {"chamfer_logit": 8.0, "chamfer_center": 0.7}}
    k, ql, dl = 3, 12, 6
    kw = dict(k=k, lamb=0.3, temp=1.0, mix=0.25, query_len=ql, db_len=dl, protocol="blind",
              cache_dir=str(tmp_path / "cache"))
    got = ames.rerank_images(model, tiny_model, queries, db, ranks, sims, **kw)[""]
    q = local.extract_local(tiny_model, queries, None, ql, dtype=np.float32)
    d = local.extract_local(tiny_model, db, None, dl, dtype=np.float32)
    d16 = np.asarray(d.desc, np.float16).astype(np.float32)
    top = ranks[:k]
    logits = model.shortlist_logits(q.desc, q.mask, d16, d.mask, top)
    cham = chamfer.scores(q.desc, q.mask, d16[top.T], d.mask[top.T]).T
    want = ames.combine(ranks, sims, logits, k=k, lamb=0.3, temp=1.0, chamfer=cham, mix=0.25,
                        chamfer_logit=8.0, chamfer_center=0.7)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], atol=2e-6)
    calls, real = [], local.extract_local
    monkeypatch.setattr(local, "extract_local", lambda m, refs, *a, **k: (
        calls.append(len(refs)) or real(m, refs, *a, **k)))
    again = ames.rerank_images(model, tiny_model, queries, db, ranks, sims, **kw)[""]
    assert calls == [len(queries)]                      # the database from the cache
    np.testing.assert_array_equal(again[0], got[0])
