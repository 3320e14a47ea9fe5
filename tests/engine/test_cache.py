"""Cache keys: every setting lands in its own directory; descriptors are keyed by the
backbone only, so a head-only change reuses them; record chunks from several writers."""
from __future__ import annotations

import numpy as np

from scvnet_jax.engine import extract
from scvnet_jax.engine.cache import BACKBONE, ChunkCache, weights_fingerprint


def test_changed_settings_get_their_own_cache(tmp_path):
    base = {"weights": "w", "gnd": "g"}
    a = ChunkCache(tmp_path, "superglobal-db", {**base, "spec": repr(extract.SuperGlobal())}, 8)
    b = ChunkCache(tmp_path, "superglobal-db",
                   {**base, "spec": repr(extract.SuperGlobal(rgem=False))}, 8)
    c = ChunkCache(tmp_path, "superglobal-db", {**base, "weights": "w2",
                                                "spec": repr(extract.SuperGlobal())}, 8)
    assert len({a.dir, b.dir, c.dir}) == 3


def test_backbone_fingerprint_ignores_the_head():
    v = {"params": {"encoder_q": {"w": np.ones(3)}, "cv_learner": {"w": np.zeros(2)}},
         "batch_stats": {"encoder_q": {"m": np.ones(2)}}}
    head = {**v, "params": {**v["params"], "cv_learner": {"w": np.ones(2)}}}
    body = {**v, "params": {**v["params"], "encoder_q": {"w": np.full(3, 2.0)}}}
    assert weights_fingerprint(v, BACKBONE) == weights_fingerprint(head, BACKBONE)
    assert weights_fingerprint(v) != weights_fingerprint(head)
    assert weights_fingerprint(v, BACKBONE) != weights_fingerprint(body, BACKBONE)


def test_chunks_and_records(tmp_path):
    c = ChunkCache(tmp_path, "x", {"k": 1}, 4)
    assert c.get(0) is None
    c.put(0, np.arange(8.0).reshape(4, 2), ["a", "b", "c", "d"])
    assert c.get(0, rows=4).shape == (4, 2) and c.get(0, rows=3) is None
    assert c.get(0, 4, ["a", "b", "c", "d"]).shape == (4, 2)
    assert c.get(0, 4, ["a", "b", "X", "d"]) is None          # an image changed: recompute
    c.put(1, np.ones((4, 2)))
    (c.dir / "chunk_000001.npz").write_bytes(b"torn")      # a torn file is recomputed
    assert c.get(1) is None
    c.add(np.ones((2, 3)))
    c.add(np.zeros((1, 3)))
    assert sorted(r.shape[0] for r in c.records()) == [1, 2]
