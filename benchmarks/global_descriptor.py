"""Throughput of `RetrievalModel.global_descriptor` (CVNet-Global, one scale).

    python benchmarks/global_descriptor.py                      # R50, 512x512 and 768x1024
    python benchmarks/global_descriptor.py --batch 8 --dtype bfloat16 --json out.json

Prints images/s, ms per batch and megapixels/s per size (after one warm-up call that
compiles), plus the ratio of each size's pixel throughput to the first size's. The
weights are random unless --weights is given: speed does not depend on their values.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import scvnet_jax as sj


def _size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=50, choices=(50, 101))
    p.add_argument("--weights", default=None, help="checkpoint or model dir (default: random)")
    p.add_argument("--sizes", default="512x512,768x1024", help="comma list of HxW")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=5, help="timed calls per size")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    model = (sj.load(args.weights, dtype=dtype) if args.weights
             else sj.create(args.depth, dtype=dtype))
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}, {jax.device_count()} "
          f"device(s)); host: {platform.processor() or platform.machine()}, "
          f"jax {jax.__version__}; R{model.depth}, {args.dtype}, batch {args.batch}")
    rows = []
    for text in args.sizes.split(","):
        h, w = _size(text)
        x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, h, w, 3)),
                        jnp.float32)
        t0 = time.perf_counter()
        model.global_descriptor(x).block_until_ready()
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            model.global_descriptor(x).block_until_ready()
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        rows.append(dict(size=f"{h}x{w}", batch=args.batch, images_per_s=args.batch / t,
                         ms_per_batch=1e3 * t, mpix_per_s=args.batch * h * w / t / 1e6,
                         first_call_s=compile_s))
    base = rows[0]["mpix_per_s"]
    print(f"{'size':>10} {'images/s':>9} {'ms/batch':>9} {'Mpix/s':>8} {'ratio':>6} "
          f"{'1st call s':>10}")
    for r in rows:
        r["mpix_ratio_to_first"] = r["mpix_per_s"] / base
        print(f"{r['size']:>10} {r['images_per_s']:9.2f} {r['ms_per_batch']:9.1f} "
              f"{r['mpix_per_s']:8.2f} {r['mpix_ratio_to_first']:6.2f} {r['first_call_s']:10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "backend": jax.default_backend(),
                       "depth": model.depth, "dtype": args.dtype, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
