"""Hand-worked cases of the revisitop protocol (the fixtures cover the bulk in tests/models/test_parity.py)."""
from __future__ import annotations

import numpy as np
import pytest

from scvnet_jax import metrics


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
