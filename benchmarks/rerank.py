"""Throughput of CVNet reranking: verification scores of one query against its top-k.

    python benchmarks/rerank.py [--weights W] [--topk 100] [--size 512x384] [--batch_size 8]

Measures the scoring step of eval.py's cvnet_rerank on synthetic inputs of one size: the
local features of the query and of `topk` database images, then `topk` (query, key) pair
scores (cross-scale correlation + CVLearner) in batches. Reports pairs/s for the scoring
alone, and ms per query for the whole top-k (key features + scores), after a warm-up that
compiles. Also times SuperGlobal reranking (M=400, K=9) of one query for comparison.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import scvnet_jax as sj


def _timed(fn, repeats):
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="checkpoint or model dir (default: random R50)")
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--size", default="512x384", help="HxW of query and database images")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    h, w = (int(v) for v in args.size.lower().split("x"))
    model = sj.load(args.weights) if args.weights else sj.create(50)
    rng = np.random.default_rng(0)
    b = args.batch_size
    query = jnp.asarray(rng.normal(size=(1, h, w, 3)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(b, h, w, 3)), jnp.float32)
    n_batches = -(-args.topk // b)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); R{model.depth}; "
          f"images {h}x{w}; top-{args.topk} in batches of {b}")

    fq = model.local_features(query)
    fk = model.local_features(keys)
    t_feat = _timed(lambda: model.local_features(keys), args.repeats)
    t_query = _timed(lambda: model.local_features(query), args.repeats)
    t_score = _timed(lambda: model.verification_score_from_features(fq, fk), args.repeats)
    pairs_per_s = b / t_score
    ms_per_query = 1e3 * (t_query + n_batches * (t_feat + t_score))

    X = jnp.asarray(rng.normal(size=(5000, 2048)), jnp.float32)
    X = X / jnp.linalg.norm(X, axis=1, keepdims=True)
    Q = X[:1]
    ranks = np.argsort(-np.asarray(X @ Q.T), axis=0)
    t_sg = _timed(lambda: jnp.asarray(sj.rerank.superglobal(X, Q, ranks)), args.repeats)

    res = {"pairs_per_s": pairs_per_s, "score_batch_ms": 1e3 * t_score,
           "key_features_batch_ms": 1e3 * t_feat, "ms_per_query_topk": ms_per_query,
           "superglobal_rerank_ms_per_query": 1e3 * t_sg}
    print(f"scoring: {pairs_per_s:.2f} pairs/s ({1e3 * t_score:.0f} ms per batch of {b})")
    print(f"key local features: {1e3 * t_feat:.0f} ms per batch of {b}")
    print(f"CVNet rerank, top-{args.topk}: {ms_per_query:.0f} ms per query "
          f"(features + scores)")
    print(f"SuperGlobal rerank (M=400, K=9), 5000 x 2048 database: {1e3 * t_sg:.1f} ms per "
          f"query; CVNet / SuperGlobal time ratio {ms_per_query / (1e3 * t_sg):.0f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, **res}, f, indent=2)


if __name__ == "__main__":
    main()
