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
