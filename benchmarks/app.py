"""The visual-search app's speed on this machine: indexing throughput, query latency (1 and
6 crops, warm model), and exact vs faiss search on a synthetic 1M-vector index.

    python benchmarks/app.py                                   # the bundled demo model
    python benchmarks/app.py --weights CVPR2022_CVNet_R50.pyth # R50 (any R50 weights time the same)
    python benchmarks/app.py --synthetic 1000000 --json out.json

Figures to compare with (users' report of a similar app: PyTorch, RTX 2080 Ti, 8k images):
~18 min to extract 8k images (~7.4 img/s), 8.1 s per 6-crop query with SuperGlobal
reranking, model load included. Here the model is loaded once (as `scvnet-search serve`
does) and warm: each query size bucket compiles once, and the persistent compilation
cache keeps that across restarts.

Collection: the photographs of ../shared/minirevisit (or --photos DIR); queries: those
photographs resized to 1024 px on the long side (the app's stated query size), searched
whole (1 crop) and with 5 proposed regions (6 crops; the regions at one scale, as
`search_regions` does by default, and, for comparison, at the three scales of the whole
query), with no reranking and with SuperGlobal reranking. Latency is measured per query after one warm-up query per size.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _percentiles(xs):
    return {"p50_ms": round(1000 * float(np.percentile(xs, 50)), 1),
            "p95_ms": round(1000 * float(np.percentile(xs, 95)), 1), "n": len(xs)}


def _queries(photos: list[Path], out: Path, n: int, size: int) -> list[Path]:
    import cv2
    qs = []
    for p in photos[:n]:
        im = cv2.imread(str(p))
        s = size / max(im.shape[:2])
        im = cv2.resize(im, (round(im.shape[1] * s), round(im.shape[0] * s)),
                        interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        q = out / f"q_{p.stem}.jpg"
        cv2.imwrite(str(q), im, [cv2.IMWRITE_JPEG_QUALITY, 92])
        qs.append(q)
    return qs


def bench_app(args) -> dict:
    import scvnet_jax as sj
    from scvnet_jax import cli
    from scvnet_jax.evaluation.config import default_cache_dir

    cli.use_compilation_cache(default_cache_dir())
    photos_dir = Path(args.photos)
    photos = sorted(sj.search.list_images(photos_dir))
    t = time.perf_counter()
    model = sj.load(sj.demo_model_path() if args.weights == "demo" else args.weights)
    load_s = time.perf_counter() - t
    tmp = Path(tempfile.mkdtemp(prefix="scvnet-app-bench-"))
    try:
        sj.search.update_index(model, photos_dir, tmp / "warm.index", backend="exact")
        t = time.perf_counter()          # compiled: a second, cold-cache-free index
        index, stats = sj.search.update_index(model, photos_dir, tmp / "bench.index",
                                              backend="exact")
        index_s = time.perf_counter() - t
        queries = _queries(photos, tmp, args.queries, args.query_size)
        out = {"weights": args.weights, "model": repr(model), "images": len(index),
               "model_load_s": round(load_s, 2),
               "index_img_per_s": round(stats["extracted"] / index_s, 2), "latency": {}}
        three = sj.search.extract.spec_of(index.family).scales
        for rerank, crops, region_scales in ((None, 1, None), (None, 6, None),
                                             ("superglobal", 1, None),
                                             ("superglobal", 6, None),
                                             ("superglobal", 6, three)):
            def one(q):
                if crops == 1:
                    return index.search(model, str(q), k=10, rerank=rerank)
                return index.search_regions(model, str(q), k=10, regions=crops - 1,
                                            rerank=rerank, region_scales=region_scales)
            for q in queries:     # warm-up: one compilation per size bucket and crop
                one(q)
            times = []
            for q in queries:
                t = time.perf_counter()
                one(q)
                times.append(time.perf_counter() - t)
            out["latency"][f"{crops} crop{'s' if crops > 1 else ''}, rerank "
                           f"{rerank or 'none'}" + (", regions at three scales"
                                                    if region_scales else "")
                           ] = _percentiles(times)
        return out
    finally:
        shutil.rmtree(tmp)


def bench_synthetic(n: int, dim: int, queries: int, kind: str) -> dict:
    """Exact search (the engine, on the accelerator) vs faiss on n clustered unit vectors
    (IVF with sqrt(n) lists, so that training fits a 2-core CPU in minutes)."""
    from scvnet_jax.engine import backends
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((max(1, n // 100), dim)).astype(np.float32)
    X = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        X[s:e] = centres[rng.integers(0, len(centres), e - s)] + \
            0.5 * rng.standard_normal((e - s, dim)).astype(np.float32)
        X[s:e] /= np.linalg.norm(X[s:e], axis=1, keepdims=True)
    Q = X[rng.choice(n, queries, replace=False)]
    out = {"vectors": n, "dim": dim, "queries": queries}
    exact = backends.create("exact", X)
    exact.search(Q[:1], 10)
    t = time.perf_counter()
    for q in Q:
        exact.search(q[None], 10)
    out["exact_ms_per_query"] = round(1000 * (time.perf_counter() - t) / queries, 2)
    t = time.perf_counter()
    approx = backends.create("faiss", X, kind=kind,
                             **({"nlist": int(np.sqrt(n))} if kind.startswith("ivf") else {}))
    out[f"faiss_{kind}_build_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    for q in Q:
        approx.search(q[None], 10)
    out[f"faiss_{kind}_ms_per_query"] = round(1000 * (time.perf_counter() - t) / queries, 2)
    out[f"faiss_{kind}_recall_at_10"] = round(backends.recall_at(approx, X, 10, queries), 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--weights", default="demo", help="demo, or an R50/R101 checkpoint or dir")
    p.add_argument("--photos", default=str(REPO.parent / "shared" / "minirevisit" /
                                           "roxford5k" / "jpg"))
    p.add_argument("--queries", type=int, default=8, help="query photos (default 8)")
    p.add_argument("--query_size", type=int, default=1024, help="long side of the queries")
    p.add_argument("--synthetic", type=int, default=0,
                   help="also time exact vs faiss on this many synthetic vectors (e.g. 1e6)")
    p.add_argument("--dim", type=int, default=256, help="dimension of the synthetic vectors")
    p.add_argument("--faiss_kind", default="ivf", help="faiss index for --synthetic")
    p.add_argument("--skip_app", action="store_true", help="only the synthetic part")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
           "date": time.strftime("%Y-%m-%d")}
    if not args.skip_app:
        res["app"] = app = bench_app(args)
        print(f"{app['model']}: {app['images']} images indexed at {app['index_img_per_s']} "
              f"img/s (model load {app['model_load_s']} s)")
        for name, lat in app["latency"].items():
            print(f"  query, {name}: p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms "
                  f"({lat['n']} queries, warm)")
    if args.synthetic:
        res["synthetic"] = syn = bench_synthetic(int(args.synthetic), args.dim, 200,
                                                 args.faiss_kind)
        k = args.faiss_kind
        print(f"{syn['vectors']} x {syn['dim']} vectors: exact {syn['exact_ms_per_query']} "
              f"ms/query; faiss {k} {syn[f'faiss_{k}_ms_per_query']} ms/query, recall@10 "
              f"{syn[f'faiss_{k}_recall_at_10']} (built in {syn[f'faiss_{k}_build_s']} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
