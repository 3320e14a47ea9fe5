"""ICFRR: Iterative Cluster-Free Re-Ranking (Hudson & Smith, 2023; github finlay-hudson/ICFRR).

Training-free; works on distances (smaller = closer). Each gallery item g gets a *rank
profile*: intersect[i, g] = the rank of g among gallery item i's neighbours (ascending
distance, 0 = i itself), minus one, so i's nearest other item has rank 0 and i itself -1.
An iteration, for each query with current ranking r_0, r_1, ...:

    score[g] = mean over the top KQ items i = r_0..r_{KQ-1} of w[intersect[i, g]]
    w = linspace(1, 0, G) with w[KG:] = 0 (and w[-1] = 0: an item never votes for itself)
    sums[p] = v[p] + beta * score[r_p]            (v = the sorted -distances, *by position*)
    new ranking = r sorted by sums, descending

Each iteration starts again from the original sorted values `v` (the scores are not
accumulated) and only the order changes. This is what the official `src/rerank.py` does
(`../shared/rerankers/README.md`); every iteration's ranking matches it exactly.

The score is computed exactly: w[r] = 1 - r/(G-1) for r < KG, so the KQ-row mean is
(count * (G-1) - rank_sum) / ((G-1) * KQ) with an integer count and rank sum, both taken
as one matrix product of the current top-KQ indicator with the G x G profile (float32
products and sums of integers, exact below 2^24). The official code sums float32 linspace
values; the two agree to float32 rounding.

Memory: ~20 bytes per gallery pair at the peak (`memory_bytes`: the G x G distances, the
rank profile and two G x G float32 vote matrices; ~490 MB at G = 4993, ROxford's size).
Above `max_bytes` (default 4 GiB, or the environment variable SCVNET_ICFRR_MAX_BYTES)
`icfrr` refuses with the amount it needs; `shortlist=S` then re-ranks each query's top S
only (not the official method, see `icfrr`). Time: 2.7 s for G = 4993 and 70 queries, 5
iterations (38 ms per query; 2-core CPU, `benchmarks/icfrr.py`), most of it sorting the
G x G distances for the rank profile.
"""
from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from scvnet_jax.errors import ConfigError, InputError

DEFAULT_MAX_BYTES = 4 << 30
# Exact float32 integer sums: count * (G - 1) and the rank sums stay below 2^24.
_EXACT = 1 << 24


def rank_matrix(gg_dists, limited_memory: bool = False) -> np.ndarray:
    """The official `intersect` matrix (G, G) int32: rank of each gallery item among row i's
    neighbours (`gg.argsort(1).argsort(1)`), minus one. With `limited_memory` (the official
    `--limited_memory` path) row i holds the ranks within *column* i of `gg_dists` instead,
    which differs where the distances are not symmetric."""
    return np.asarray(_ranks(gg_dists, bool(limited_memory)))


def _ranks(gg_dists, limited_memory: bool):
    """`rank_matrix` where it is fastest: XLA's sort on accelerators; on CPU NumPy's (one
    stable argsort and its inverse permutation, ~3x faster than XLA:CPU's two sorts)."""
    if jax.default_backend() != "cpu":
        return _rank_matrix(jnp.asarray(gg_dists, jnp.float32), limited_memory)
    gg = np.asarray(gg_dists, np.float32)
    if limited_memory:
        gg = gg.T
    order = np.argsort(gg, axis=1, kind="stable")
    ranks = np.empty(gg.shape, np.int32)
    np.put_along_axis(ranks, order, np.arange(gg.shape[1], dtype=np.int32)[None, :] - 1,
                      axis=1)
    return jnp.asarray(ranks)


@partial(jax.jit, static_argnames=("limited_memory",))
def _rank_matrix(gg, limited_memory: bool):
    if limited_memory:
        gg = gg.T
    order = jnp.argsort(gg, axis=1, stable=True)
    return (jnp.argsort(order, axis=1, stable=True) - 1).astype(jnp.int32)


def memory_bytes(n_gallery: int, n_queries: int = 1) -> int:
    """Memory ICFRR needs at its peak for G gallery items, ~20 bytes per gallery pair: the
    G x G distances (float32), the sort order (int64) and ranks (int32) of the rank profile,
    then its two float32 vote matrices; plus per-query rows. (Measured on CPU at G = 4993,
    70 queries: 492 MB above what the process held before, against 481 MB stated.)"""
    g = int(n_gallery)
    return 20 * g * g + 16 * g * int(n_queries)


def clipped(KG: int, KQ: int, n_gallery: int) -> tuple[int, int, str]:
    """(KG, KQ) as ICFRR uses them on a gallery of `n_gallery` items (neither can exceed
    it: the defaults 256 / 250 are for galleries of thousands), and a note saying so when
    that changed them ("" otherwise)."""
    g = int(n_gallery)
    kg, kq = min(int(KG), g), min(int(KQ), g)
    if (kg, kq) == (int(KG), int(KQ)):
        return kg, kq, ""
    return kg, kq, (f"icfrr: KG={KG}, KQ={KQ} clipped to the database size ({g} images): "
                    f"KG={kg}, KQ={kq}")


def _check(qg, gg, KG, KQ, beta, n_times):
    if qg.ndim != 2 or gg.ndim != 2 or gg.shape != (qg.shape[1], qg.shape[1]):
        raise InputError(f"qg_dists must be (n_queries, G) and gg_dists (G, G); got "
                         f"{qg.shape} and {gg.shape}")
    for name, v in (("KG", KG), ("KQ", KQ), ("n_times", n_times)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (
                0 if name == "n_times" else 1):
            raise ConfigError(f"icfrr: {name} must be an integer >= "
                              f"{0 if name == 'n_times' else 1}, got {v!r}")
    if not np.isfinite(beta):
        raise ConfigError(f"icfrr: beta must be a finite number, got {beta!r}")
    if not (np.all(np.isfinite(qg)) and np.all(np.isfinite(gg))):
        raise InputError("icfrr: the distances hold NaN or infinite values")


def icfrr(qg_dists, gg_dists, KG: int = 256, KQ: int = 250, beta: float = 0.5,
          n_times: int = 5, limited_memory: bool = False, return_all: bool = False, *,
          max_bytes: int | None = None, shortlist: int | None = None,
          return_scores: bool = False):
    """ICFRR re-ranking of a whole gallery.

    Args:
      qg_dists: (nq, G) query-to-gallery distances (e.g. `torch.cdist` of L2-normalised
        descriptors, or sqrt(2 - 2 * similarity)); smaller is closer.
      gg_dists: (G, G) gallery-to-gallery distances.
      KG: only a gallery item's KG nearest gallery neighbours get a vote (weight > 0).
      KQ: how many of the query's current top items vote. Both are clipped to the gallery
        (or shortlist) size (`clipped`; eval.py prints a note when they are).
      beta: weight of the votes against the original (negated) distances.
      n_times: iterations.
      limited_memory: the official `--limited_memory` profile (ranks along columns of
        gg_dists; the same as the default for symmetric distances).
      return_all: return every iteration's ranking, [0] the initial sort.
      max_bytes: refuse (InputError saying how much is needed) when the G x G matrices
        would take more device memory (default SCVNET_ICFRR_MAX_BYTES or 4 GiB).
      shortlist: re-rank only each query's top `shortlist` items, with the profile
        restricted to them (not the official method, which uses the whole gallery; items
        below the shortlist keep their order). Memory then grows with S^2 per query.
      return_scores: also return what the final ranking is sorted by: (n, nq) float32,
        the last iteration's sums (negated distance + beta x votes) of the first n
        returned items, descending (n = G, or the shortlist).
    Returns:
      (G, nq) int64 gallery indices per query, best first (with return_all:
      (n_times + 1, G, nq)).
    """
    qg = np.asarray(qg_dists, np.float32)
    gg = np.asarray(gg_dists, np.float32)
    _check(qg, gg, KG, KQ, beta, n_times)
    if shortlist is not None:
        out, sums = _shortlisted(qg, gg, int(KG), int(KQ), float(beta), int(n_times),
                                 bool(limited_memory), shortlist)
        out = np.transpose(out, (0, 2, 1)).astype(np.int64)
        out = out if return_all else out[-1]
        return (out, sums) if return_scores else out
    g = qg.shape[1]
    limit = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
    if max_bytes is None and os.environ.get("SCVNET_ICFRR_MAX_BYTES"):
        limit = int(os.environ["SCVNET_ICFRR_MAX_BYTES"])
    need = memory_bytes(g, qg.shape[0])
    if need > limit:
        raise InputError(
            f"icfrr: a gallery of {g} items needs {need / 2**30:.2f} GiB of device memory "
            f"for its {g} x {g} rank profiles (limit {limit / 2**30:.2f} GiB; raise it with "
            "max_bytes= or SCVNET_ICFRR_MAX_BYTES, or pass shortlist=S to re-rank each "
            "query's top S only, which is not the official method)")
    ranks, _, sums, vals = iterations(qg, gg, KG, KQ, beta, n_times, limited_memory)
    out = np.transpose(ranks, (0, 2, 1)).astype(np.int64)
    out = out if return_all else out[-1]
    if not return_scores:
        return out
    final = np.sort(sums[-1], axis=1)[:, ::-1] if n_times else vals
    return out, np.ascontiguousarray(final.T)


def iterations(qg_dists, gg_dists, KG: int, KQ: int, beta: float, n_times: int,
               limited_memory: bool = False):
    """Every intermediate of the official loop, as NumPy:
    (ranks (n_times + 1, nq, G) [0] = the initial sort, scores (n_times, nq, G): each
    iteration's votes in the order of the ranking entering it, sums (n_times, nq, G):
    what it sorts, sorted_vals (nq, G): the negated distances sorted descending)."""
    qg = jnp.asarray(qg_dists, jnp.float32)
    g = qg.shape[1]
    if g < 2:   # nothing to re-rank (and linspace(1, 0, 1) would be [1])
        r = np.zeros((n_times + 1, qg.shape[0], g), np.int64)
        z = np.zeros((n_times, qg.shape[0], g), np.float32)
        return r, z, z + np.asarray(-qg)[None], np.asarray(-qg)
    R = _ranks(gg_dists, bool(limited_memory))
    kg, kq, _ = clipped(KG, KQ, g)
    if max(kq * (g - 1), kq * kg * 2) >= _EXACT:
        raise InputError(f"icfrr: KQ={KQ} with a gallery of {g} is past the exact range of "
                         "the vote sums (KQ * G < 2^24); use a shortlist")
    out = _iterate(qg, R, kg, kq, jnp.float32(beta), int(n_times))
    return tuple(np.asarray(a) for a in out)


@partial(jax.jit, static_argnames=("kg", "kq", "n_times"))
def _iterate(qg, R, kg: int, kq: int, beta, n_times: int):
    g = qg.shape[1]
    order = jnp.argsort(qg, axis=1, stable=True)                  # ascending distance
    vals = jnp.take_along_axis(-qg, order, axis=1)                # -dist, descending
    votes = (R >= 0) & (R < kg)                                   # w[R] > 0
    count_m = votes.astype(jnp.float32)                           # (G, G)
    rank_m = jnp.where(votes, R, 0).astype(jnp.float32)
    denom = jnp.float32((g - 1) * kq)

    def step(ranks, _):
        top = jnp.zeros((ranks.shape[0], g), jnp.float32).at[
            jnp.arange(ranks.shape[0])[:, None], ranks[:, :kq]].set(1.0)
        count = jnp.matmul(top, count_m, precision="highest")      # exact integers
        rsum = jnp.matmul(top, rank_m, precision="highest")
        score = (count * jnp.float32(g - 1) - rsum) / denom       # the mean vote, (nq, G)
        score = jnp.take_along_axis(score, ranks, axis=1)          # in ranking order
        sums = vals + beta * score
        new = jnp.take_along_axis(ranks, jnp.argsort(-sums, axis=1, stable=True), axis=1)
        return new, (new, score, sums)

    _, (ranks, scores, sums) = jax.lax.scan(step, order, None, length=n_times)
    return jnp.concatenate([order[None], ranks]), scores, sums, vals


def _shortlisted(qg, gg, KG, KQ, beta, n_times, limited_memory, s):
    """Per query: ICFRR on its top-s items only (their own s x s distances) -> (ranks
    (n_times + 1, nq, G), the final sums of the top s (s, nq))."""
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
        raise ConfigError(f"icfrr: shortlist must be an integer >= 1, got {s!r}")
    nq, g = qg.shape
    s = min(int(s), g)
    initial = np.argsort(qg, axis=1, kind="stable")
    out = np.repeat(initial[None], n_times + 1, axis=0)
    scores = np.zeros((s, nq), np.float32)
    for q in range(nq):
        top = initial[q, :s]
        ranks, _, sums, vals = iterations(qg[q:q + 1, top], gg[np.ix_(top, top)], KG, KQ,
                                          beta, n_times, limited_memory)
        out[:, q, :s] = top[ranks[:, 0]]
        scores[:, q] = np.sort(sums[-1, 0])[::-1] if n_times else vals[0]
    return out, scores
