"""What query regions do to retrieval results: each query of a revisited-layout benchmark
is searched alone, and with `--regions` proposed regions merged into its list
(`Index.search_regions`, each image's best score), the regions described at one scale (the
default, `sj.search.REGION_SCALES`) or at the family's three; mAP E/M/H for each.

    python benchmarks/regions.py --data_dir ~/.cache/scvnet_jax/demo_benchmark --dataset demo
    python benchmarks/regions.py --data_dir ../shared/minirevisit --dataset roxford5k

The speed side of the same choice is timed by benchmarks/app.py.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data_dir", required=True, help="folder holding DATASET/gnd_*.pkl, jpg/")
    p.add_argument("--dataset", required=True, help="roxford5k, rparis6k or demo")
    p.add_argument("--weights", default="demo", help="demo, or an official checkpoint/dir")
    p.add_argument("--family", default="cvnet", choices=("cvnet", "superglobal"))
    p.add_argument("--regions", type=int, default=5)
    args = p.parse_args(argv)
    if args.regions < 1:
        p.error(f"--regions {args.regions}: expected an integer >= 1")
    from scvnet_jax import cli
    return cli.run(lambda: bench(args))     # bad data or weights: one error line, exit 2


def bench(args) -> int:
    import scvnet_jax as sj
    from scvnet_jax import metrics
    from scvnet_jax.data.revisitop import load_dataset
    from scvnet_jax.engine import extract

    ds = load_dataset(args.data_dir, args.dataset)
    model = sj.load(sj.demo_model_path() if args.weights == "demo" else args.weights)
    db = ds.db_images()
    index = sj.search.Index([r.path for r in db],
                            sj.search.describe(model, db, args.family), args.family)
    row = {p: i for i, p in enumerate(index.paths)}
    n = len(index)
    print(f"{args.dataset}: {ds.n_queries} queries, {n} database images; {model!r}, "
          f"{args.family}, {args.regions} regions")
    print(f"{'regions described at':<28} {'E':>6} {'M':>6} {'H':>6}")
    for label, scales in (("no regions (query alone)", "none"), ("one scale (default)", None),
                          ("three scales", extract.spec_of(args.family).scales)):
        ranks = []
        for q in ds.query_images():
            if scales == "none":
                hits = index.search(model, q.path, k=n, boxes=[q.bbx])[0]
            else:
                hits, _ = index.search_regions(model, q.path, k=n, regions=args.regions,
                                               box=q.bbx, region_scales=scales)
            ranks.append([row[h.path] for h in hits])
        e, m, h, _ = metrics.revisitop(np.array(ranks).T, ds.gnd)
        print(f"{label:<28} {100 * e:6.2f} {100 * m:6.2f} {100 * h:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
