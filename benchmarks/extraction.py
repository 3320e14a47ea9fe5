"""Throughput of the full descriptor extraction of eval.py on a folder of images.

    python benchmarks/extraction.py IMAGE_DIR [--weights W] [--limit 64] [--bucket 64]

Times, per family, the official three-scale CVNet-Global extraction (OpenCV resizes, 3
backbone passes per image) and the SuperGlobal extraction (ReLU+, R-GeM, GeM+, S-GeM, 3
scales inside the model), both with image decoding, bucketing and padding as eval.py does
them. Each family runs twice: the first pass includes compilation (one per size bucket),
the second is the steady state. Prints images/s and the ratio SuperGlobal / CVNet.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import scvnet_jax as sj
from scvnet_jax.engine import extract
from scvnet_jax.images import ImageRef


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image_dir", help="folder of .jpg/.png images")
    p.add_argument("--weights", help="checkpoint or model dir (default: random R50)")
    p.add_argument("--limit", type=int, default=64, help="images to use (default 64)")
    p.add_argument("--batch_size", type=int, default=8, help="images per device per batch")
    p.add_argument("--bucket", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    paths = sorted(q for q in Path(args.image_dir).iterdir()
                   if q.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.limit]
    refs = [ImageRef(str(q)) for q in paths]
    dtype = jnp.dtype(args.dtype)
    model = sj.load(args.weights, dtype=dtype) if args.weights else sj.create(50, dtype=dtype)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); R{model.depth} "
          f"{args.dtype}; {len(refs)} images from {args.image_dir}; batch {args.batch_size}, "
          f"bucket {args.bucket}")
    rows = {}
    for spec in (extract.CVNetGlobal(), extract.SuperGlobal()):
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            extract.extract(model, refs, spec, batch_size=args.batch_size, bucket=args.bucket,
                            desc=spec.name)
            times.append(time.perf_counter() - t0)
        rows[spec.name] = {"first_pass_s": times[0], "steady_s": times[1],
                           "images_per_s": len(refs) / times[1]}
    print(f"{'extraction':>12} {'images/s':>9} {'steady s':>9} {'1st pass s':>10}")
    for name, r in rows.items():
        print(f"{name:>12} {r['images_per_s']:9.2f} {r['steady_s']:9.1f} {r['first_pass_s']:10.1f}")
    ratio = rows["superglobal"]["images_per_s"] / rows["cvnet_global"]["images_per_s"]
    print(f"superglobal / cvnet_global throughput ratio: {ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": jax.devices()[0].device_kind,
                                               "results": rows, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
