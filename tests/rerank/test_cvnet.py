"""CVNet reranking's two protocols on a hand-made case (the official protocol's fixture
ranks are checked in tests/models/test_parity.py)."""
from __future__ import annotations

import numpy as np
import pytest

from scvnet_jax.rerank import cvnet


def test_cvnet_rerank_protocols():
    gnd = [{"easy": [1], "hard": [2], "junk": [3]}]
    ranks = np.array([[3], [0], [2], [1], [4]])
    sim = np.array([[0.5], [0.1], [0.3], [0.9], [0.0]])
    scores = np.array([[0.0], [1.0], [1.0], [np.nan], [1.0]])  # no score for junk needed
    # Easy: skip junk 3 and hard 2 -> rerank {0, 1}; sim+0.5*score: 0 -> 0.5, 1 -> 0.6.
    rE, rM, rH = cvnet.official(ranks, sim, scores, gnd, topk=2)
    assert rE[:, 0].tolist() == [3, 1, 2, 0, 4]
    # Medium: skip junk -> rerank {0, 2}: 0 -> 0.5, 2 -> 0.8.
    assert rM[:, 0].tolist() == [3, 2, 0, 1, 4]
    # Hard: skip junk and easy -> rerank {0, 2}.
    assert rH[:, 0].tolist() == [3, 2, 0, 1, 4]
    assert sorted(cvnet.official_candidates(ranks, gnd, 2)[0].tolist()) == [0, 1, 2]
    # Blind: the plain top-2 (3 and 0) need scores; item 3 has none.
    with pytest.raises(ValueError, match="no verification score"):
        cvnet.blind(ranks, sim, scores, topk=2)
    scores[3, 0] = 0.0
    # Top-3 {3, 0, 2}: 3 -> 0.9, 0 -> 0.5, 2 -> 0.8.
    assert cvnet.blind(ranks, sim, scores, topk=3)[:, 0].tolist() == [3, 2, 0, 1, 4]


def test_verifier_working_size(tmp_path, monkeypatch):
    """Option max_side (eval.py's cvnet.max_side) is the working size of the verifier's
    local features, whatever the images' (the global descriptors'): a head trained on 160 px
    views lost mAP on larger photos (issue 35) and gains at its training size. None (the
    default): as before, the images' working size."""
    import cv2

    from scvnet_jax.engine import verify
    from scvnet_jax.images import ImageRef
    from scvnet_jax.rerank import registry

    refs = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), np.full((60 + i, 120, 3), 40 * i, np.uint8))
        refs.append(ImageRef(str(path)))
    seen = []

    def local_features(model, images, batch_size, bucket):   # the sizes the verifier reads
        seen.extend(im.shape[:2] for im in images)
        return [np.zeros((1, 1, 1), np.float32) for _ in images]

    monkeypatch.setattr(verify, "local_features", local_features)
    monkeypatch.setattr(verify, "corr_features", lambda model, f, *a: f)
    monkeypatch.setattr(verify, "score_pairs", lambda model, pairs, *a: {
        pid: 0.5 for pid, _, _ in pairs})
    X = np.eye(3, dtype=np.float32)
    ranks = np.array([[0, 1], [1, 0], [2, 2]])
    inputs = lambda: registry.Inputs(X, X[:2], ranks, model=object(), query_images=refs[:2],
                                     db_images=refs)
    registry.rerank("cvnet", inputs(), topk=2, mix=0.5, protocol="blind", max_side=30)
    assert seen and max(max(s) for s in seen) == 30, seen
    seen.clear()
    registry.rerank("cvnet", inputs(), topk=2, mix=0.5, protocol="blind")
    assert max(max(s) for s in seen) == 120, seen
