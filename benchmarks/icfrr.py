"""ICFRR at ROxford size: milliseconds per query and peak memory of `sj.rerank.icfrr` for a
gallery of G items and nq queries (synthetic L2-normalised descriptors; the method's cost
depends on G, nq, KQ and the iterations, not on the values).

    python benchmarks/icfrr.py                        # G = 4993 (ROxford5k), 70 queries
    python benchmarks/icfrr.py --gallery 20000 --json out.json

Prints the time of one call after a warm-up call (compiled once for these shapes), its
per-query share, the memory the method states it needs (`icfrr.memory_bytes`) and the
process's peak resident memory above what it held before the first call (the inputs
included: the G x G distances).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import numpy as np


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gallery", type=int, default=4993, help="G (ROxford5k: 4993)")
    p.add_argument("--queries", type=int, default=70, help="nq (ROxford5k: 70)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--KG", type=int, default=256)
    p.add_argument("--KQ", type=int, default=250)
    p.add_argument("--n_times", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import jax
    import scvnet_jax as sj
    from scvnet_jax.rerank.icfrr import memory_bytes
    from scvnet_jax.rerank.registry import distances

    rng = np.random.default_rng(0)
    X = rng.normal(size=(args.gallery, args.dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Q = X[rng.choice(args.gallery, args.queries, replace=False)] + 0.3 * rng.normal(
        size=(args.queries, args.dim)).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    qg, gg = distances(Q, X), distances(X, X)
    kw = dict(KG=args.KG, KQ=args.KQ, n_times=args.n_times)
    before = _rss_now_mb()
    t0 = time.perf_counter()
    sj.rerank.icfrr(qg, gg, **kw)                       # compiles
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    sj.rerank.icfrr(qg, gg, **kw)
    dt = time.perf_counter() - t0
    res = {"gallery": args.gallery, "queries": args.queries, **kw,
           "seconds": dt, "ms_per_query": 1000 * dt / args.queries,
           "first_call_seconds": warm,
           "stated_memory_mb": memory_bytes(args.gallery, args.queries) / 2**20,
           "peak_rss_growth_mb": _rss_peak_mb() - before, "peak_rss_mb": _rss_peak_mb(),
           "rss_before_mb": before,
           "device": str(jax.devices()[0]), "cpu": platform.processor() or platform.machine()}
    print(f"ICFRR G={args.gallery} nq={args.queries} KG={args.KG} KQ={args.KQ} "
          f"n_times={args.n_times} on {res['device']}: {dt:.2f} s, "
          f"{res['ms_per_query']:.1f} ms/query (first call, compiling: {warm:.2f} s); "
          f"stated memory {res['stated_memory_mb']:.0f} MB; peak RSS {res['peak_rss_mb']:.0f} MB, "
          f"+{res['peak_rss_growth_mb']:.0f} MB over the {before:.0f} MB held before (inputs "
          "included)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
