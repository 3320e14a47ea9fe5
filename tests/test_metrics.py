"""Hand-worked cases of the revisitop protocol (the fixtures cover the bulk in test_parity)."""
from __future__ import annotations

import numpy as np
import pytest

from scvnet_jax import metrics
from scvnet_jax.rerank import cvnet


def test_ap_by_hand():
    # Database 0..4; ranking 3 1 4 0 2; positives {3, 4}: at positions 0 and 2.
    ranks = np.array([[3], [1], [4], [0], [2]])
    m, aps, pr, prs = metrics.compute_map(ranks, [{"ok": [3, 4], "junk": []}], [1, 2, 5])
    # Trapezoids: j=0 rank 0 -> (1 + 1) / 2 * 1/2; j=1 rank 2 -> (1/2 + 2/3) / 2 * 1/2.
    assert m == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    # mP@k with k clipped to the last positive's position (3): @1 = 1, @2 = 1/2, @5 -> @3 = 2/3.
    np.testing.assert_allclose(pr, [1.0, 0.5, 2 / 3])
    # Declaring image 1 junk removes it from the ranking: positives at 0 and 1 -> AP 1.
    m, *_ = metrics.compute_map(ranks, [{"ok": [3, 4], "junk": [1]}], [1])
    assert m == 1.0


def test_queries_without_positives_are_excluded():
    ranks = np.array([[0, 0], [1, 1]])
    m, aps, pr, prs = metrics.compute_map(ranks, [{"ok": [0], "junk": []},
                                                  {"ok": [], "junk": [1]}], [1])
    assert m == 1.0 and pr[0] == 1.0
    assert np.isnan(aps[1]) and np.isnan(prs[1]).all()


def test_settings_use_the_right_positives():
    gnd = [{"easy": [0], "hard": [1], "junk": [2]}]
    ranks = np.array([[1], [2], [0], [3]])  # hard first, junk, easy, negative
    mE, mM, mH, mpk = metrics.revisitop(ranks, gnd, ks=(1,))
    assert mE == 1.0      # hard and junk are ignored for Easy
    assert mH == 1.0      # easy and junk are ignored for Hard
    assert mM == 1.0      # junk ignored: hard at 0, easy at 1
    # One ranking per setting is accepted too.
    bad = np.array([[3], [2], [1], [0]])
    mE2, mM2, mH2, _ = metrics.revisitop((ranks, bad, ranks), gnd)
    assert (mE2, mH2) == (1.0, 1.0) and mM2 < 1.0


def test_revisitop_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="n_queries=2"):
        metrics.compute_map(np.zeros((5, 3), int), [{"ok": [1]}, {"ok": [2]}])


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
