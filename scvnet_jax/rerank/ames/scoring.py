"""The official AMES re-ranking of a shortlist (`src/utils/metrics.py: rerank` of
github pavelsuma/ames): the protocols (`shortlist`), the combined score (`combine`) and the
official mAP on the shortlist (`shortlist_map`)."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from scvnet_jax.errors import ConfigError, InputError
from scvnet_jax.rerank.ames.model import AMESReranker

PROTOCOLS = ("official", "blind")
SETTINGS = ("medium", "hard")

def _check_shortlist(ranks, sims):
    ranks, sims = np.asarray(ranks), np.asarray(sims, np.float32)
    if ranks.ndim != 2 or ranks.shape != sims.shape or ranks.shape[0] < 1:
        raise InputError(f"ames: ranks and sims must both be (K, nq), best first; got "
                         f"{ranks.shape} and {sims.shape}")
    return ranks.astype(np.int64), sims


def shortlist(ranks, sims, *, protocol: str = "official", gnd=None,
              setting: str = "medium"):
    """The shortlist the official code re-ranks: (ranks, sims) (K, nq) of the first stage;
    protocol "official" moves each query's junk (setting "medium"), resp. junk and easy
    ("hard") images to the end of its shortlist, order kept (the official code does so
    when the ground truth has 'junk'), "blind" returns them as they are."""
    ranks, sims = _check_shortlist(ranks, sims)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"ames: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if setting not in SETTINGS:
        raise ConfigError(f"ames: setting must be one of {SETTINGS}, got {setting!r}")
    if protocol == "blind":
        return ranks, sims
    if gnd is None:
        raise ConfigError("ames: protocol 'official' needs the ground truth (gnd); use "
                          "'blind' on data without labels")
    if isinstance(gnd, Mapping):
        gnd = gnd["gnd"]
    if len(gnd) != ranks.shape[1]:
        raise InputError(f"ames: {len(gnd)} ground-truth entries for {ranks.shape[1]} queries")
    if not len(gnd) or "junk" not in gnd[0]:
        return ranks, sims
    ranks, sims = ranks.copy(), sims.copy()
    for i, g in enumerate(gnd):
        moved = list(g.get("junk", ())) + (list(g.get("easy", ())) if setting == "hard" else [])
        is_junk = np.isin(ranks[:, i], np.asarray(moved, np.int64))
        order = np.concatenate([np.flatnonzero(~is_junk), np.flatnonzero(is_junk)])
        ranks[:, i], sims[:, i] = ranks[order, i], sims[order, i]
    return ranks, sims


def with_chamfer(logits, chamfer, chamfer_logit: float, chamfer_center: float):
    """The logit of a model trained on top of chamfer (`ames.chamfer_logit` a,
    `chamfer_center` c): logits + a x (chamfer - c), float32; a = 0: logits as given."""
    if not float(chamfer_logit):
        return logits
    return (np.asarray(logits, np.float32) + np.float32(chamfer_logit)
            * (np.asarray(chamfer, np.float32) - np.float32(chamfer_center)))


def combine(ranks, sims, logits, *, k: int = 100, lamb: float = 0.5, temp: float = 0.5,
            chamfer=None, mix: float = 0.0, chamfer_logit: float = 0.0,
            chamfer_center: float = 0.0):
    """The official scoring of a shortlist (ranks, sims (K, nq)) with the model's logits
    (>= min(k, K), nq) of its first rows: s = lamb * sims + (1 - lamb) * sigmoid(temp *
    logit) over the first k, in float32 as the official code; they are sorted by s
    (descending), the rest unchanged -> (ranks (K, nq) int64, s sorted (min(k, K), nq)).

    Not the official scoring, for models trained here with the training-free chamfer
    score of the same pairs (`chamfer`, shaped like logits): `chamfer_logit` a > 0 (a
    model trained on top of chamfer, `ames.chamfer_logit` and `chamfer_center` c) makes
    the logit logit + a x (chamfer - c); `mix` > 0 shares the local part with chamfer:
    s = lamb * sims + (1 - lamb) * (mix * chamfer + (1 - mix) * sigmoid(temp * logit))."""
    ranks, sims = _check_shortlist(ranks, sims)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"ames: k must be an integer >= 1, got {k!r}")
    if not 0 <= float(mix) <= 1:
        raise ConfigError(f"ames: mix must be in [0, 1], got {mix!r}")
    k = min(int(k), ranks.shape[0])
    raw = np.asarray(logits, np.float32)
    if raw.ndim != 2 or raw.shape[1] != ranks.shape[1] or raw.shape[0] < k:
        raise InputError(f"ames: logits must be (>= {k}, {ranks.shape[1]}), got {raw.shape}")
    c = None
    if float(mix) > 0 or float(chamfer_logit) != 0:
        if chamfer is None:
            raise ConfigError("ames: mix or chamfer_logit needs the chamfer scores of the "
                              "same pairs")
        c = np.asarray(chamfer, np.float32)
        if c.ndim != 2 or c.shape[1] != ranks.shape[1] or c.shape[0] < k:
            raise InputError(f"ames: chamfer must be (>= {k}, {ranks.shape[1]}), got "
                             f"{c.shape}")
        c = c[:k]
        raw = with_chamfer(raw[:k], c, chamfer_logit, chamfer_center)
    with np.errstate(over="ignore"):
        s = np.float32(1.0) / (np.float32(1.0) + np.exp(np.float32(-temp) * raw[:k]))
    if float(mix) > 0:
        s = np.float32(mix) * c + np.float32(1 - mix) * s
    s = np.float32(lamb) * sims[:k] + np.float32(1 - lamb) * s
    order = np.argsort(-s, axis=0, kind="stable")
    out = ranks.copy()
    out[:k] = np.take_along_axis(ranks[:k], order, axis=0)
    return out, np.take_along_axis(s, order, axis=0)


def rerank(model: AMESReranker, q_local, q_mask, db, db_mask, ranks, sims, *, k: int = 100,
           lamb: float = 0.5, temp: float = 0.5, protocol: str = "official", gnd=None,
           setting: str = "medium", db_format: str = "local", batch_size: int = 64,
           return_logits: bool = False):
    """The official AMES re-ranking (`src/utils/metrics.py: rerank`) of one (k, lamb, temp).

    Args:
      model: an AMES (`load`, `from_state_dict`).
      q_local, q_mask: the queries' descriptors (nq, Q, local_dim) and mask (True = padding).
      db, db_mask: the database (N, T, ...) in `db_format` ("local" descriptors, "tokens"
        from `db_tokens`, "packed" dist codes), read by index (np.memmap is fine).
      ranks, sims: the first stage's shortlist (K, nq), best first, and its similarities.
      k, lamb, temp: how many are re-ranked; the official defaults are 100 / 0.5 / 0.5 (the
        authors' best for CVNet descriptors: fp 0.85 / 0.8, dist 0.65 / 0.2).
      protocol, gnd, setting: see `shortlist`.
    Returns:
      (ranks (K, nq) int64, scores (min(k, K), nq) float32, descending): the re-ranked
      shortlist and what its first rows are sorted by; with return_logits also the logits
      (min(k, K), nq) in the (protocol's) shortlist order, to try other lamb / temp with
      `combine` without running the model again.
    """
    ranks, sims = shortlist(ranks, sims, protocol=protocol, gnd=gnd, setting=setting)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"ames: k must be an integer >= 1, got {k!r}")
    kk = min(int(k), ranks.shape[0])
    logits = model.shortlist_logits(q_local, q_mask, db, db_mask, ranks[:kk],
                                    db_format=db_format, batch_size=batch_size)
    out, scores = combine(ranks, sims, logits, k=kk, lamb=lamb, temp=temp)
    return (out, scores, logits) if return_logits else (out, scores)


def shortlist_map(ranks, gnd) -> tuple[float, float, float]:
    """The official E, M, H mAP (fractions) of re-ranked shortlists (K, nq): revisitop's
    protocol on the shortlist alone, AP normalised by min(#positives, K) (the official
    `compute_map` on the (K, nq) ranks it gets)."""
    from scvnet_jax import metrics
    if isinstance(gnd, Mapping):
        gnd = gnd["gnd"]
    ranks = np.asarray(ranks)
    return tuple(metrics.compute_map(ranks, metrics.setting_gnd(gnd, s), (),
                                     nres_cap=ranks.shape[0])[0] for s in metrics.SETTINGS)
