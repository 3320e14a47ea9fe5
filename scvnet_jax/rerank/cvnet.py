"""CVNet reranking: reorder the top-k of a global ranking by
global similarity + mix x CVNet-Rerank verification score.

Two protocols:

* `official`: what the official CVNet test code does on ROxford/RParis. Per query and per
  setting (Easy, Medium, Hard) it walks the global ranking, skips the images that setting
  ignores (junk always; hard for Easy, easy for Hard) and reranks the first k of the rest,
  so the ground truth decides *what* is reranked, and each setting gets its own ranking.
  Use it only to reproduce published numbers.
* `blind`: reranks the plain top-k without looking at labels: what a user's own data needs.

Both take the verification scores as a dense (n_db, n_q) array (NaN where not computed);
`official_candidates` / `blind_candidates` say which pairs need a score.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from scvnet_jax.errors import InputError

_SETTINGS = ("E", "M", "H")


def _as_sets(gnd: Sequence[Mapping]):
    return [{k: set(np.asarray(q.get(k, ()), dtype=np.int64).ravel().tolist())
             for k in ("easy", "hard", "junk")} for q in gnd]


def _official_selection(ranks: np.ndarray, gnd_sets, i: int, topk: int):
    """Positions j (into ranks[:, i]) reranked for query i in settings E, M, H."""
    chosen = {s: [] for s in _SETTINGS}
    g = gnd_sets[i]
    for j in range(ranks.shape[0]):
        if all(len(chosen[s]) >= topk for s in _SETTINGS):
            break
        r = int(ranks[j, i])
        if r in g["junk"]:
            continue
        if r in g["easy"]:
            take = (True, True, False)
        elif r in g["hard"]:
            take = (False, True, True)
        else:  # negative
            take = (True, True, True)
        for s, t in zip(_SETTINGS, take):
            if t and len(chosen[s]) < topk:
                chosen[s].append(j)
    return chosen


def official_candidates(ranks: np.ndarray, gnd: Sequence[Mapping], topk: int) -> list[np.ndarray]:
    """Per query, the database indices whose verification score the official protocol
    needs (the union over E, M, H), in ranking order."""
    ranks = np.asarray(ranks)
    gs = _as_sets(gnd)
    out = []
    for i in range(ranks.shape[1]):
        sel = _official_selection(ranks, gs, i, topk)
        js = sorted(set(sel["E"]) | set(sel["M"]) | set(sel["H"]))
        out.append(ranks[js, i].astype(np.int64))
    return out


def blind_candidates(ranks: np.ndarray, topk: int) -> list[np.ndarray]:
    """Per query, the top-k database indices."""
    ranks = np.asarray(ranks)
    return [ranks[:topk, i].astype(np.int64) for i in range(ranks.shape[1])]


def _rerank_positions(ranks_out, ranks, sim, scores, i, positions, mix):
    if not positions:
        return
    idx = ranks[positions, i]
    s = scores[idx, i]
    if np.isnan(s).any():
        missing = idx[np.isnan(s)]
        raise InputError(f"query {i}: no verification score for database items {missing[:5]}")
    mixed = sim[idx, i] + s * mix
    order = np.argsort(-mixed)  # numpy's default sort, as the official code
    ranks_out[positions, i] = idx[order]


def official(ranks, sim, scores, gnd: Sequence[Mapping], topk: int, mix: float = 0.5):
    """The official CVNet protocol -> (ranks_E, ranks_M, ranks_H), each (n_db, n_q).

    Args:
      ranks: (n_db, n_q) global ranking, best first.
      sim: (n_db, n_q) global similarities (database x query).
      scores: (n_db, n_q) verification scores, NaN where not computed (at least the
        `official_candidates` pairs must be present).
      gnd: per-query dicts with 'easy', 'hard', 'junk'.
      topk: how many non-ignored images to rerank per setting.
      mix: weight of the verification score.
    """
    ranks, sim, scores = np.asarray(ranks), np.asarray(sim), np.asarray(scores)
    gs = _as_sets(gnd)
    outs = {s: ranks.copy() for s in _SETTINGS}
    for i in range(ranks.shape[1]):
        sel = _official_selection(ranks, gs, i, topk)
        for s in _SETTINGS:
            _rerank_positions(outs[s], ranks, sim, scores, i, sel[s], mix)
    return outs["E"], outs["M"], outs["H"]


def blind(ranks, sim, scores, topk: int, mix: float = 0.5) -> np.ndarray:
    """Reranks the plain top-k of every query by sim + mix x score -> (n_db, n_q)."""
    ranks, sim, scores = np.asarray(ranks), np.asarray(sim), np.asarray(scores)
    out = ranks.copy()
    positions = list(range(min(topk, ranks.shape[0])))
    for i in range(ranks.shape[1]):
        _rerank_positions(out, ranks, sim, scores, i, positions, mix)
    return out
