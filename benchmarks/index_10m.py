"""An index larger than memory at 10 million vectors: build time, peak memory, disk, query
latency and recall@10 of the on-disk IVF-PQ index (`scvnet_jax.engine.ondisk`).

    python benchmarks/index_10m.py --out /data/index10m [--n 10000000] [--dim 2048]
        [--nlist 4096] [--nprobe 64] [--shortlist 100] [--queries 1000]
        [--exact_queries 100] [--json results.json]

The vectors: --n clustered synthetic unit vectors of --dim dimensions (float16 on disk:
41 GB at 10 M x 2048): N/100 clusters whose centres lie in a random 96-dimensional
subspace, each vector its centre plus a within-cluster offset in that subspace plus
isotropic noise in all dimensions; queries are new draws from random clusters (not in the
index). Each shard is drawn from its own seed, so a rerun (same arguments) reuses the
finished shards, the faiss index and the exact answers it finds in --out.

Steps, each timed: write the shards; train the IVF-PQ index on a sample and add the
shards one by one (`build_ivfpq`, its lists on disk); the exact top 10 of
--exact_queries queries by streaming every shard (`exact_topk`); then, in a fresh
process (so that its memory is that of searching alone), open the index and search
--queries queries one at a time: the latency of the IVF-PQ shortlist alone and with the
exact re-scoring of the top --shortlist from the memory-mapped float16 vectors
(`rescored`), p50/p95, recall@10 of both against the exact answers, and the process's
peak resident memory (VmHWM: the pages of the memory-mapped files it touched count).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LATENT = 96


def _space(dim: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, LATENT)))[0].T.astype(np.float32)
    centres = rng.standard_normal((max(1, n // 100), LATENT), dtype=np.float32)
    return basis, centres


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x


def draw(basis, centres, count: int, seed: int) -> np.ndarray:
    """`count` unit vectors (float32): a random cluster's centre + an offset in the
    subspace (0.5 of the centres' spread) + isotropic noise (0.15 of a unit vector; each
    row the normalised sum of two rows of a pool of 16384 Gaussian rows, which is much
    faster to draw than fresh Gaussians and gives 2.7e8 different noise vectors)."""
    rng = np.random.default_rng(seed)
    dim = basis.shape[1]
    z = centres[rng.integers(0, len(centres), count)]
    z += 0.5 * rng.standard_normal(z.shape, dtype=np.float32)
    x = _unit(z @ basis)
    pool = _noise_pool(dim)
    noise = pool[rng.integers(0, len(pool), count)]
    noise += pool[rng.integers(0, len(pool), count)]
    x += (0.15 / np.sqrt(2 * dim)) * noise
    return _unit(x)


_POOL: dict = {}


def _noise_pool(dim: int) -> np.ndarray:
    if dim not in _POOL:
        _POOL[dim] = np.random.default_rng(12345).standard_normal((16384, dim),
                                                                  dtype=np.float32)
    return _POOL[dim]


def _du(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def build(args) -> dict:
    from scvnet_jax.engine import ondisk
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    basis, centres = _space(args.dim, args.n, args.seed)
    times = {}
    t0 = time.perf_counter()
    writer = ondisk.ShardWriter(out, args.dim, args.shard_rows, skip_done=True)
    done = 0
    for s in range(0, args.n, args.shard_rows):
        count = min(args.shard_rows, args.n - s)
        if count == args.shard_rows and writer.next_is_done():
            writer.skip()
            done += 1
        else:
            writer.add(draw(basis, centres, count, args.seed + 1 + s // args.shard_rows))
        print(f"shards: {len(writer.files) + (1 if writer._n else 0)} of "
              f"{-(-args.n // args.shard_rows)} ({done} reused)", end="\r", flush=True)
    rows = writer.finish()
    times["write_shards_s"] = round(time.perf_counter() - t0, 1)
    print()
    layout = {k: v for k, v in (("nlist", args.nlist), ("nprobe", args.nprobe),
                                ("pca", args.pca), ("m", args.m)) if v is not None}
    t0 = time.perf_counter()
    if not (out / ondisk.FAISS_FILE).is_file():
        ondisk.build_ivfpq(rows, out, layout=layout, train_size=args.train_size,
                           progress=True)
    times["build_ivfpq_s"] = round(time.perf_counter() - t0, 1)
    Q = draw(basis, centres, args.queries, args.seed + 10**6)
    exact = out / f"exact_{args.exact_queries}.npz"
    t0 = time.perf_counter()
    if not exact.is_file():
        scores, ids = ondisk.exact_topk(rows, Q[:args.exact_queries], 10, progress=True)
        np.savez(exact, scores=scores, ids=ids)
    times["exact_stream_s"] = round(time.perf_counter() - t0, 1)
    np.save(out / "queries.npy", Q)
    return {"n": args.n, "dim": args.dim, "shards": len(rows.files),
            "disk_gb": round(_du(out) / 1e9, 2), "build": times,
            "build_peak_rss_gb": round(_peak_rss() / 2**30, 2),
            "layout": {**ondisk.check_layout((args.n, args.dim), **layout)}}


def _peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def search(args) -> dict:
    """In its own process: open the index, search the queries one at a time."""
    from scvnet_jax.engine import ondisk
    from scvnet_jax.engine.backends import overlap_at
    out = Path(args.out)
    t0 = time.perf_counter()
    files = sorted((out / ondisk.SHARD_DIR).glob("shard-*.npy"))
    rows = ondisk.Rows(files, dim=args.dim)
    layout = ondisk.check_layout(rows.shape, **{k: v for k, v in (
        ("nlist", args.nlist), ("nprobe", args.nprobe), ("pca", args.pca), ("m", args.m))
        if v is not None})
    backend = ondisk.DiskIVFPQ.open(out, layout, *rows.shape)
    open_s = time.perf_counter() - t0
    Q = np.load(out / "queries.npy")
    with np.load(out / f"exact_{args.exact_queries}.npz") as z:
        exact = z["ids"]
    pq_ms, total_ms, pq_ids, re_ids = [], [], [], []
    for i, q in enumerate(Q):
        q = q[None]
        t1 = time.perf_counter()
        _, ids = backend.search(q, 10)
        t2 = time.perf_counter()
        _, rid = ondisk.rescored(backend, rows, q, 10, args.shortlist)
        t3 = time.perf_counter()
        pq_ms.append(1000 * (t2 - t1))
        total_ms.append(1000 * (t3 - t2))       # its own shortlist search + re-scoring
        if i < len(exact):
            pq_ids.append(ids[0])
            re_ids.append(rid[0, :10])

    def recall(got):
        return overlap_at(exact, got, 10)

    def pct(v, p):
        return round(float(np.percentile(v, p)), 2)
    return {"open_s": round(open_s, 2), "queries": len(Q), "shortlist": args.shortlist,
            "ivfpq_ms_p50": pct(pq_ms, 50), "ivfpq_ms_p95": pct(pq_ms, 95),
            "rescored_ms_p50": pct(total_ms, 50), "rescored_ms_p95": pct(total_ms, 95),
            "recall_at_10_ivfpq": round(recall(pq_ids), 4),
            "recall_at_10_rescored": round(recall(re_ids), 4),
            "search_peak_rss_gb": round(_peak_rss() / 2**30, 3), "layout": layout}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--out", required=True, help="folder of the index (41 GB at 10 M x 2048)")
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--shard_rows", type=int, default=1 << 18)
    p.add_argument("--nlist", type=int, default=4096)
    p.add_argument("--nprobe", type=int, default=64)
    p.add_argument("--pca", type=int, default=None)
    p.add_argument("--m", type=int, default=None)
    p.add_argument("--train_size", type=int, default=163840)
    p.add_argument("--shortlist", type=int, default=100)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--exact_queries", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--drop_caches", action="store_true",
                   help="drop the kernel's page cache before searching (root), so that the "
                        "search reads the index from disk, as a server started cold does")
    p.add_argument("--search_only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from scvnet_jax import cli
    if args.search_only:
        return cli.run(lambda: print(json.dumps(search(args))) or 0)

    def run():
        for name, v in (("n", args.n), ("dim", args.dim), ("shard_rows", args.shard_rows),
                        ("queries", args.queries), ("exact_queries", args.exact_queries),
                        ("shortlist", args.shortlist), ("train_size", args.train_size)):
            if v < 1:
                from scvnet_jax.errors import InputError
                raise InputError(f"--{name}: expected a positive integer, got {v}")
        result = build(args)
        if args.drop_caches:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("1")
        cmd = [sys.executable, __file__, "--search_only", *(argv if argv is not None
                                                            else sys.argv[1:])]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            sys.stderr.write(res.stderr)
            return res.returncode
        result["search"] = json.loads(res.stdout.strip().splitlines()[-1])
        result["machine"] = f"{os.cpu_count()} CPUs"
        result["page_cache"] = "dropped before the search" if args.drop_caches else "as left"
        print(json.dumps(result, indent=1))
        if args.json:
            from scvnet_jax import files
            files.atomic_write_text(args.json, json.dumps(result, indent=1))
        return 0
    return cli.run(run)


if __name__ == "__main__":
    sys.exit(main())
