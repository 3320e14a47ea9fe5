"""Hand-worked cases of the revisitop protocol (the fixtures cover the bulk in tests/models/test_parity.py)."""
from __future__ import annotations

import numpy as np
import pytest

from scvnet_jax import metrics
from scvnet_jax.errors import InputError


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
    with pytest.raises(InputError, match="n_queries=2"):
        metrics.compute_map(np.zeros((5, 3), int), [{"ok": [1]}, {"ok": [2]}])


# -- GLDv2 retrieval (DELF's MeanAveragePrecision / MeanPrecisions) ----------------------------

def test_gldv2_map_by_hand_k3():
    # Database 0..9, k=3 so every AP is worked out by hand; rows are positions 1, 2, 3, ...
    ranks = np.array([[0, 9, 1, 2, 3, 4, 5, 6, 7, 8],    # q0 public,  gt {0,1,2,3,4}
                      [9, 8, 7, 5, 0, 1, 2, 3, 4, 6],    # q1 public,  gt {5}
                      [6, 7, 0, 1, 2, 3, 4, 5, 8, 9],    # q2 private, gt {6,7}
                      [0, 8, 1, 2, 3, 4, 5, 6, 7, 9]]).T  # q3 private, gt {8}
    gnd = [{"easy": np.array([0, 1, 2, 3, 4]), "usage": "public", "hard": [], "junk": []},
           {"easy": np.array([5]), "usage": "public"},
           {"easy": np.array([6, 7]), "usage": "private"},
           {"easy": np.array([8]), "usage": "private"}]
    maps, mpk = metrics.gldv2_retrieval(ranks, gnd, ks=(1, 2, 5), k=3)
    # q0: hits at 1 and 3 (the one at 4 is past k): (1/1 + 2/3) / min(5, 3) = 5/9.
    # q1: its positive is at 4, none in the top 3: AP 0, still in the mean.
    # q2: hits at 1, 2: (1 + 1) / 2 = 1.   q3: hit at 2: (1/2) / 1 = 1/2.
    # public (5/9 + 0) / 2 = 5/18; private (1 + 1/2) / 2 = 3/4.
    assert maps == pytest.approx({"public": 5 / 18, "private": 0.75})
    # P@1, P@2, P@5 (k caps AP only): q0 1, 1/2, 4/5; q1 0, 0, 1/5; q2 1, 1, 2/5;
    # q3 0, 1/2, 1/5 -> public 1/2, 1/4, 1/2; private 1/2, 3/4, 3/10.
    assert mpk["public"] == pytest.approx([0.5, 0.25, 0.5])
    assert mpk["private"] == pytest.approx([0.5, 0.75, 0.3])
    # Through the protocol entry point (k=100 there): q0 (1 + 2/3 + 3/4 + 4/5 + 5/6) / 5,
    # q1 (1/4) / 1, so public differs; q2, q3 are unchanged.
    maps100, _ = metrics.score("gldv2", ranks, gnd, ks=(1,))
    q0 = (1 + 2 / 3 + 3 / 4 + 4 / 5 + 5 / 6) / 5
    assert maps100 == pytest.approx({"public": (q0 + 0.25) / 2, "private": 0.75})


def test_gldv2_map_at_100_by_hand():
    # Database 0..249. q0: gt {100, 200}, db 100 at position 1, db 200 at position 101.
    # q1: gt {0..149} (150 > 100), ranked first.
    rest = [i for i in range(250) if i not in (100, 200)]
    r0 = [100] + rest[:99] + [200] + rest[99:]
    r1 = list(range(250))
    ranks = np.array([r0, r1]).T
    gnd = [{"easy": np.array([100, 200]), "usage": "public"},
           {"easy": np.arange(150), "usage": "public"}]
    maps, mpk = metrics.gldv2_retrieval(ranks, gnd, ks=(1, 100))
    # q0: only position 1 counts: (1/1) / min(2, 100) = 1/2 (not (1 + 2/101) / 2).
    # q1: 100 hits in the top 100, each precision 1: 100 / min(150, 100) = 1.
    assert maps == {"public": pytest.approx(0.75)}      # no private queries: left out
    # P@1: 1, 1; P@100: 1/100, 1.
    assert mpk == {"public": pytest.approx([1.0, 0.505])}
    # A ranking truncated to its first rows: same numbers at >= 100 rows; at 3 rows
    # q1 has 3 hits: 3/100, and P@100 counts the missing rows as wrong: q0 1/100, q1 3/100.
    assert metrics.gldv2_retrieval(ranks[:100], gnd, ks=(1, 100)) == (maps, mpk)
    maps3, mpk3 = metrics.gldv2_retrieval(ranks[:3], gnd, ks=(1, 100))
    assert maps3["public"] == pytest.approx((0.5 + 0.03) / 2)
    assert mpk3["public"] == pytest.approx([1.0, 0.02])


def test_gldv2_repeated_prediction_counts_once():
    # Ranking 1 1 2, gt {1, 2}: the repeat at 2 is skipped, 2 is correct at position 3:
    # (1/1 + 2/3) / 2 = 5/6; P@3 = 2/3.
    maps, mpk = metrics.gldv2_retrieval(np.array([[1], [1], [2]]),
                                        [{"easy": [1, 2], "usage": "private"}], ks=(3,))
    assert maps == {"private": pytest.approx(5 / 6)}
    assert mpk == {"private": pytest.approx([2 / 3])}


def test_gldv2_rejects_bad_input():
    gnd = [{"easy": [1], "usage": "public"}, {"easy": [2], "usage": "private"}]
    with pytest.raises(InputError, match="n_queries=2"):
        metrics.gldv2_retrieval(np.zeros((5, 3), int), gnd)
    with pytest.raises(InputError, match="no ground-truth images"):
        metrics.gldv2_retrieval(np.zeros((5, 1), int), [{"easy": [], "usage": "public"}])
    with pytest.raises(InputError, match="'public' or 'private'"):
        metrics.gldv2_retrieval(np.zeros((5, 1), int), [{"easy": [1], "usage": "Public"}])
