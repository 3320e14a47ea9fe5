"""CVNet-Rerank verification scores (`engine.verify`) beyond what tests/engine/test_extract.py
checks over devices and processes: a key that is a query's image reuses its features."""
from __future__ import annotations

import numpy as np

from scvnet_jax.engine import verify
from scvnet_jax.images import ImageRef


def test_keys_that_are_queries_reuse_their_features(tiny_model, demo_benchmark, tmp_path,
                                                    monkeypatch):
    """A folder set's queries are database images: their local features are computed once,
    and the scores equal those of the same files under other names (no reuse)."""
    jpgs = sorted((demo_benchmark / "demo" / "jpg").glob("*.jpg"))[:6]
    db = [ImageRef(str(p)) for p in jpgs]
    links = []
    for p in jpgs[:2]:
        (tmp_path / p.name).symlink_to(p)
        links.append(ImageRef(str(tmp_path / p.name)))
    cand = [np.array([0, 2, 3]), np.array([1, 0, 4])]
    counted, real = [], verify.local_features
    monkeypatch.setattr(verify, "local_features", lambda m, images, *a: counted.append(
        len(images)) or real(m, images, *a))
    got = verify.verification_scores(tiny_model, db[:2], db, cand, bucket="auto",
                                     feature_bucket="auto")
    assert sum(counted) == 2 + 3          # the two queries, then keys 2, 3 and 4 only
    counted.clear()
    want = verify.verification_scores(tiny_model, links, db, cand, bucket="auto",
                                      feature_bucket="auto")
    assert sum(counted) == 2 + 5
    assert np.isfinite(got).sum() == 6
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6, equal_nan=True)
