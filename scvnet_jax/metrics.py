"""The revisited Oxford/Paris evaluation protocol (Radenovic et al., CVPR 2018).

`compute_map` has the exact semantics of revisitop's `compute_map` (trapezoidal AP, junk
images removed from the ranking, the mP@k definition with k clipped to the last positive,
queries without positives skipped) and reproduces its floating-point results bit for bit:
every sum is accumulated in the same order as the reference loop.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from scvnet_jax.errors import ConfigError, InputError

SETTINGS = ("E", "M", "H")


def _ap_from_positions(pos: np.ndarray, nres: int) -> float:
    """Trapezoidal average precision from 0-based (junk-adjusted) positions of positives."""
    if pos.size == 0:
        return 0.0
    rank = pos.astype(np.float64)
    j = np.arange(pos.size, dtype=np.float64)
    p0 = np.divide(j, rank, out=np.ones_like(rank), where=pos != 0)
    p1 = (j + 1.0) / (rank + 1.0)
    terms = (p0 + p1) * (1.0 / nres) / 2.0
    return float(np.add.accumulate(terms)[-1])  # sequential, as `ap += term`


def compute_map(ranks: np.ndarray, gnd: Sequence[Mapping], kappas: Sequence[int] = (),
                nres_cap: int | None = None):
    """mAP and mean precision@k of `ranks` (n_db, n_q) against [{'ok': .., 'junk': ..}].

    nres_cap: AP is normalised by min(#positives, nres_cap) instead of #positives (AMES's
    evaluation of shortlists passes their length, as its `compute_map` does).

    Returns (map, aps, pr, prs) like revisitop: aps (nq,) and prs (nq, len(kappas)) are NaN
    for queries without positives, which are excluded from the means.
    """
    ranks = np.asarray(ranks)
    nq = len(gnd)
    if ranks.ndim != 2 or ranks.shape[1] != nq:
        raise InputError(f"ranks must be (n_db, n_queries={nq}), got shape {ranks.shape}")
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    total_ap, pr, nempty = 0.0, np.zeros(len(kappas)), 0
    for i in range(nq):
        ok = np.asarray(gnd[i]["ok"], dtype=np.int64).ravel()
        if ok.size == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            nempty += 1
            continue
        junk = np.asarray(gnd[i].get("junk", ()), dtype=np.int64).ravel()
        col = ranks[:, i]
        pos = np.flatnonzero(np.isin(col, ok))
        junk_pos = np.flatnonzero(np.isin(col, junk))
        pos = pos - np.searchsorted(junk_pos, pos, side="left")
        ap = _ap_from_positions(pos, ok.size if nres_cap is None else min(ok.size, nres_cap))
        total_ap = total_ap + ap
        aps[i] = ap
        pos1 = pos + 1
        for j, kappa in enumerate(kappas):
            if pos1.size == 0:
                prs[i, j] = 0.0
                continue
            kq = min(int(pos1.max()), int(kappa))
            prs[i, j] = (pos1 <= kq).sum() / kq
        pr = pr + prs[i, :]
    count = nq - nempty
    if count == 0:
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return total_ap / count, aps, pr / count, prs


def setting_gnd(gnd: Sequence[Mapping], setting: str) -> list[dict]:
    """revisitop's positives/junk for a setting: E (easy vs junk+hard), M (easy+hard vs
    junk) or H (hard vs junk+easy)."""
    def cat(q, *names):
        return np.concatenate([np.asarray(q.get(n, ()), dtype=np.int64).ravel() for n in names])

    spec = {"E": (("easy",), ("junk", "hard")), "M": (("easy", "hard"), ("junk",)),
            "H": (("hard",), ("junk", "easy"))}
    if setting not in spec:
        raise ConfigError(f"setting must be one of {SETTINGS}, got {setting!r}")
    ok, junk = spec[setting]
    return [{"ok": cat(q, *ok), "junk": cat(q, *junk)} for q in gnd]


def revisitop(ranks, gnd, ks: Sequence[int] = (1, 5, 10)):
    """Revisited-protocol mAP for Easy, Medium, Hard and mP@ks.

    Args:
      ranks: (n_db, n_q) database indices per query, best first; or a sequence of three such
        arrays (one per setting E, M, H, as the official CVNet reranking yields).
      gnd: per-query dicts with 'easy', 'hard', 'junk' (revisitop's `cfg['gnd']`), or the
        whole revisitop config dict holding them under 'gnd'.
      ks: the k of mP@k.
    Returns:
      (mapE, mapM, mapH, mpk): mAPs as fractions in [0, 1] and mpk, (3, len(ks)) mean
      precisions with rows E, M, H.
    """
    maps, mpk, _ = _revisitop(ranks, gnd, ks)
    return maps[0], maps[1], maps[2], np.stack(mpk)


def _revisitop(ranks, gnd, ks):
    """`revisitop`'s ([mAP E, M, H], [mP@ks E, M, H]) and [per-query AP E, M, H]."""
    if isinstance(gnd, Mapping):
        gnd = gnd["gnd"]
    if isinstance(ranks, np.ndarray) and ranks.ndim == 2:
        per_setting = [ranks] * 3
    else:
        per_setting = list(ranks)
        if len(per_setting) != 3:
            raise InputError("ranks must be one (n_db, n_q) array or three of them (E, M, H)")
    maps, mpk, aps = [], [], []
    for setting, r in zip(SETTINGS, per_setting):
        m, ap, pr, _ = compute_map(np.asarray(r), setting_gnd(gnd, setting), list(ks))
        maps.append(m)
        mpk.append(pr)
        aps.append(ap)
    return maps, mpk, aps


# -- one entry point per benchmark protocol ----------------------------------------------------

# protocol -> the settings it reports
PROTOCOLS = {"revisitop": SETTINGS,      # Easy / Medium / Hard (revisited Oxford and Paris)
             "single": ("all",),         # revisitop's AP with one set of positives, no hard
             "gldv2": ("public", "private")}  # GLDv2 retrieval: mAP@100 per Usage subset


def score(protocol: str, ranks, gnd, ks: Sequence[int] = (1, 5, 10)
          ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """({setting: mAP}, {setting: [mP@k for k in ks]}) of `ranks` (n_db, n_q), or for
    "revisitop" also three rankings (E, M, H), under a benchmark's protocol:

      revisitop  `revisitop` (gnd: easy, hard, junk).
      single     `compute_map` with positives easy + hard and junk ignored: what a benchmark
                 without hard labels has (the revisitop settings would all be the same).
      gldv2      `gldv2_retrieval` (gnd: easy = the index images of the solution, usage).
    """
    return score_queries(protocol, ranks, gnd, ks)[:2]


def score_queries(protocol: str, ranks, gnd, ks: Sequence[int] = (1, 5, 10)
                  ) -> tuple[dict[str, float], dict[str, list[float]], dict[str, np.ndarray]]:
    """`score`'s (mAP, mP@k) and, per setting, every query's AP (n_q,) float64: NaN where
    the query does not count in that setting's mAP (revisitop: no positives; GLDv2: a query
    of the other Usage subset), so each setting's mAP is the mean of its non-NaN APs."""
    if protocol == "revisitop":
        maps, mpk, aps = _revisitop(ranks, gnd, ks)
        return (dict(zip(SETTINGS, maps)),
                {s: [float(v) for v in row] for s, row in zip(SETTINGS, mpk)},
                dict(zip(SETTINGS, aps)))
    if protocol == "single":
        m, ap, pr, _ = compute_map(np.asarray(ranks), setting_gnd(gnd, "M"), list(ks))
        return {"all": m}, {"all": [float(v) for v in pr]}, {"all": ap}
    if protocol == "gldv2":
        return _gldv2(ranks, gnd, ks)
    raise ConfigError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")


def gldv2_retrieval(ranks, gnd, ks: Sequence[int] = (1, 5, 10), k: int = 100
                    ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The Google Landmark Retrieval protocol (GLDv2; DELF's `MeanAveragePrecision` and
    `MeanPrecisions`), per Usage subset ("public", "private"):

      mAP@k  mean over the subset's queries of AP@k = sum, over the correct predictions
             among the first k, of (correct so far / position), divided by
             min(#ground-truth images, k); a query with none in its top k has AP 0 and
             counts in the mean
      mP@kk  mean over the subset's queries of (correct among the first kk) / kk

    A repeated database index in a ranking counts once (its first occurrence), as the
    official code skips duplicate predictions; positions still advance.

    Args:
      ranks: (n_rows, n_q) database indices per query, best first: the full ranking or
        its first rows (n_rows >= 1; the first min(k, n_rows) count for mAP, and rows
        missing below kk count as wrong predictions for mP@kk).
      gnd: per query {"easy": ground-truth database indices, "usage": "public"|"private"}.
    Returns:
      ({subset: mAP@k}, {subset: [mP@kk for kk in ks]}) as floats in [0, 1]; a subset
      without queries is left out.
    """
    return _gldv2(ranks, gnd, ks, k)[:2]


def _gldv2(ranks, gnd, ks: Sequence[int] = (1, 5, 10), k: int = 100):
    """gldv2_retrieval's (mAP, mP@k) and per-subset per-query AP@k (NaN elsewhere)."""
    ranks = np.asarray(ranks)
    nq = len(gnd)
    if ranks.ndim != 2 or ranks.shape[1] != nq or ranks.shape[0] < 1:
        raise InputError(f"ranks must be (n_db >= 1, n_queries={nq}), got shape {ranks.shape}")
    ks = [int(kk) for kk in ks]
    if int(k) < 1 or any(kk < 1 for kk in ks):
        raise ConfigError(f"k and ks must be positive, got k={k}, ks={ks}")
    if nq == 0:
        return {}, {}, {}
    top = ranks[:max([int(k), *ks])].astype(np.int64)            # (d, nq)
    if top.min() < 0:
        raise InputError("ranks must hold non-negative database indices")
    usage = np.array([str(q.get("usage")) for q in gnd])
    bad = sorted(set(usage.tolist()) - {"public", "private"})
    if bad:
        raise InputError(f"gnd 'usage' must be 'public' or 'private', got {bad}")
    pos = [np.asarray(q["easy"], dtype=np.int64).ravel() for q in gnd]
    n_gt = np.array([p.size for p in pos])
    if (n_gt == 0).any():
        raise InputError(f"query {int(np.argmin(n_gt))} has no ground-truth images (AP@k is "
                         "undefined; such test images are 'Ignored' in GLDv2)")
    # Relevance of every (row, query) by one isin on (query, index) keys.
    allpos = np.concatenate(pos)
    base = int(max(top.max(), allpos.max())) + 1
    qcol = np.arange(nq, dtype=np.int64)
    keys = top + base * qcol[None, :]
    rel = np.isin(keys, allpos + base * np.repeat(qcol, n_gt))
    # Only the first occurrence of a repeated index counts.
    order = np.argsort(top, axis=0, kind="stable")
    srt = np.take_along_axis(top, order, axis=0)
    dup = np.zeros_like(rel)
    np.put_along_axis(dup, order, np.vstack([np.zeros((1, nq), bool), srt[1:] == srt[:-1]]),
                      axis=0)
    rel &= ~dup
    hits = np.cumsum(rel, axis=0)                                 # correct so far
    d = min(int(k), rel.shape[0])
    position = np.arange(1, d + 1, dtype=np.float64)[:, None]
    ap = (np.where(rel[:d], hits[:d] / position, 0.0).sum(axis=0)
          / np.minimum(n_gt, int(k)))
    prec = np.stack([hits[min(kk, rel.shape[0]) - 1] / kk for kk in ks], axis=1) \
        if ks else np.zeros((nq, 0))                              # (nq, len(ks))
    maps, mpk, aps = {}, {}, {}
    for subset in PROTOCOLS["gldv2"]:
        sel = usage == subset
        if sel.any():
            maps[subset] = float(ap[sel].mean())
            mpk[subset] = [float(v) for v in prec[sel].mean(axis=0)]
            aps[subset] = np.where(sel, ap, np.nan)
    return maps, mpk, aps


# -- class-labelled retrieval ----------------------------------------------------------------

def labelled(ranks, query_labels, db_labels, map_at: Sequence[int | None] = (None, 200),
             precision_at: Sequence[int] = (25, 100, 200)) -> dict:
    """Retrieval metrics of class-labelled data (a database item is relevant to a query when
    their labels are equal), as ICFRR's `calc_metrics` computes them with torchmetrics'
    `retrieval_average_precision`:

      mAP@k  mean over queries of AP of the top-k list (k=None: the whole ranking), AP =
             mean over the relevant items in that list of (their count so far / position);
             0 for a query with none in it (such queries count in the mean)
      P@k    relevant items among the top k, divided by k (even where fewer than k exist)

    Args:
      ranks: (n_db, n_q) database indices per query, best first.
    Returns:
      {"mAP@all" or "mAP@<k>": float, "P@<k>": float} (fractions in [0, 1]).
    """
    ranks = np.asarray(ranks)
    ql, dl = np.asarray(query_labels).ravel(), np.asarray(db_labels).ravel()
    if ranks.ndim != 2 or ranks.shape != (dl.size, ql.size):
        raise InputError(f"ranks must be (n_db, n_q) = ({dl.size}, {ql.size}), got "
                         f"{ranks.shape}")
    rel = dl[ranks] == ql[None, :]                       # (n_db, n_q), in ranking order
    out = {}
    for k in map_at:
        r = rel if k is None else rel[:k]
        hits = np.cumsum(r, axis=0)
        pos = np.arange(1, r.shape[0] + 1, dtype=np.float64)[:, None]
        n = r.sum(axis=0)
        ap = np.where(n > 0, np.sum(np.where(r, hits / pos, 0.0), axis=0) / np.maximum(n, 1),
                      0.0)
        out["mAP@all" if k is None else f"mAP@{k}"] = float(ap.mean())
    for k in precision_at:
        out[f"P@{k}"] = float((rel[:k].sum(axis=0) / k).mean())
    return out
