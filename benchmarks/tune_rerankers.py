"""Choose the training-free rerankers' settings on the demo *training* photos, never on the
benchmark they are then evaluated on.

    python benchmarks/tune_rerankers.py                   # the bundled demo model
    python benchmarks/tune_rerankers.py --weights runs/demo/model --json tuned.json

The demo training set (72 classes x 12 views of 11 scikit-image photographs, disjoint from
the 6 photographs of the demo benchmark) is split per class: its first `--queries` views
are queries, the others the database. Descriptors are the model's (`--family`, as eval.py's
first stage computes them: whole images, same scales); relevance is the class. For
alpha-QE, alpha-DBA and ICFRR every setting of a small grid is scored by mAP over the
whole ranking (`sj.metrics.labelled`), and the best one of each is printed (and written
with --json); configs/eval_demo.py holds the result. For chamfer (the top 100 re-scored by
lamb x similarity + (1 - lamb) x the local score, on the model's 64 local descriptors
per image, as eval.py reads them) the grid is lamb; --skip_chamfer leaves it out. For
spatial (the top 100 sorted by the inliers of one robust fit among the mutual nearest
neighbours of 256 local descriptors per image) the grid is the geometry and its inlier
distance; --skip_spatial leaves it out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import numpy as np

GRIDS = {
    "alpha_qe": {"k": [1, 2, 3, 5, 8], "alpha": [0.0, 1.0, 3.0]},
    "dba": {"k": [1, 2, 3, 5, 8], "alpha": [0.0, 1.0, 3.0]},
    "icfrr": {"KG": [5, 10, 20, 50], "KQ": [2, 3, 5, 10], "beta": [0.1, 0.5, 1.0],
              "n_times": [1, 3, 5]},
}


def split(labels: np.ndarray, per_class: int):
    """(query rows, database rows): the first `per_class` images of each class query."""
    first = np.r_[0, np.flatnonzero(np.diff(labels)) + 1]
    q = np.sort(np.concatenate([f + np.arange(per_class) for f in first]))
    return q, np.setdiff1d(np.arange(len(labels)), q)


CHAMFER_LAMB = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def tune_chamfer(model, ts, qi, di, sim, ranks, ql, dl, base, k: int = 100, length: int = 64):
    """The chamfer reranker's lamb on the training split: the local score of each query's
    top k computed once, then every lamb scored."""
    import scvnet_jax as sj
    from scvnet_jax.data.sources import Records
    from scvnet_jax.engine import local
    from scvnet_jax.rerank import chamfer

    t0 = time.perf_counter()
    records = Records(ts)
    images = [records.record(int(i))[0] for i in range(ts.num_examples)]
    feats = local.describe_local(model, images, None, length, local.SCALES, dtype=np.float32)
    q, qm = feats.desc[qi], feats.mask[qi]
    db, dbm = feats.desc[di], feats.mask[di]
    kk = min(k, ranks.shape[0])
    top = ranks[:kk].T                                       # (nq, kk)
    c = chamfer.scores(q, qm, db[top], dbm[top]).T           # (kk, nq)
    top_sim = np.take_along_axis(sim, ranks, axis=0)
    scored = []
    for lamb in CHAMFER_LAMB:
        rr, _ = chamfer.combine(ranks, top_sim, c, k=kk, lamb=lamb)
        scored.append((sj.metrics.labelled(rr, ql, dl)["mAP@all"], {"lamb": lamb}))
    best_map, best = max(scored, key=lambda t: t[0])
    print(f"chamfer   best {100 * best_map:6.2f} ({100 * (best_map - base):+.2f}) with "
          f"{best} (top {kk}); " + ", ".join(f"{o['lamb']}: {100 * m:.2f}" for m, o in scored)
          + f"; {time.perf_counter() - t0:.0f} s")
    return {"mAP": best_map, "options": best}, [{"mAP": m, "options": o} for m, o in scored]


SPATIAL_GRID = {"method": ["homography", "fundamental"], "threshold": [8.0, 16.0, 24.0]}


def tune_spatial(model, ts, qi, di, sim, ranks, ql, dl, base, k: int = 100,
                 length: int = 256):
    """The spatial reranker's method and threshold on the training split: the mutual
    nearest neighbours of each query and its top k, then every setting's fits scored."""
    import types

    import scvnet_jax as sj
    from scvnet_jax.data.sources import Records
    from scvnet_jax.engine import local
    from scvnet_jax.rerank import spatial

    t0 = time.perf_counter()
    records = Records(ts)
    images = [records.record(int(i))[0] for i in range(ts.num_examples)]
    feats = local.describe_local(model, images, None, length, local.SCALES, dtype=np.float32)
    kk = min(k, ranks.shape[0])
    top = di[ranks[:kk].T]                                   # (nq, kk) rows of `feats`
    table = np.concatenate([feats.yx, feats.desc], axis=-1).astype(np.float16)
    settings = list(itertools.product(*SPATIAL_GRID.values()))
    inl = np.zeros((len(settings), kk, len(qi)), np.int32)
    for a in range(0, len(qi), 8):                  # 8 queries at a time: bounded memory
        b = slice(a, a + 8)
        q = types.SimpleNamespace(desc=feats.desc[qi[b]], mask=feats.mask[qi[b]],
                                  yx=feats.yx[qi[b]])
        for j, (method, threshold) in enumerate(settings):
            inl[j, :, b] = spatial.inlier_counts(q, table[top[b]], feats.mask[top[b]],
                                                 method=method, threshold=threshold).T
    top_sim = np.take_along_axis(sim, ranks, axis=0)
    scored = []
    for j, (method, threshold) in enumerate(settings):
        rr, _ = spatial.combine(ranks, top_sim, inl[j], k=kk)
        scored.append((sj.metrics.labelled(rr, ql, dl)["mAP@all"],
                       {"method": method, "threshold": threshold}))
    best_map, best = max(scored, key=lambda t: t[0])
    print(f"spatial   best {100 * best_map:6.2f} ({100 * (best_map - base):+.2f}) with "
          f"{best} (top {kk}); " + ", ".join(
              f"{o['method']} {o['threshold']:g}: {100 * m:.2f}" for m, o in scored)
          + f"; {time.perf_counter() - t0:.0f} s")
    return {"mAP": best_map, "options": best}, [{"mAP": m, "options": o} for m, o in scored]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="a model (default: the bundled demo model)")
    p.add_argument("--family", default="superglobal", choices=("cvnet", "superglobal"))
    p.add_argument("--data_dir", default="~/tensorflow_datasets",
                   help="TFDS folder holding (or to build) demo_landmarks")
    p.add_argument("--queries", type=int, default=2, help="query views per class")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--skip_chamfer", action="store_true", help="no chamfer lamb sweep")
    p.add_argument("--skip_spatial", action="store_true", help="no spatial sweep")
    p.add_argument("--skip_grids", action="store_true",
                   help="no alpha-QE, DBA and ICFRR grids")
    args = p.parse_args(argv)

    import scvnet_jax as sj
    from scvnet_jax.data.sources import open_or_build
    from scvnet_jax.engine import extract, search
    from scvnet_jax.rerank import registry

    model = sj.load(args.weights or sj.demo_model_path())
    ts = open_or_build("demo_landmarks", args.data_dir)
    labels = ts.labels()
    desc = extract.extract_training_set(model, ts, extract.spec_of(args.family),
                                        desc="training photos")
    qi, di = split(labels, args.queries)
    X, Q, ql, dl = desc[di], desc[qi], labels[qi], labels[di]
    sim, ranks = search.rank(X, Q)
    base = sj.metrics.labelled(ranks, ql, dl)["mAP@all"]
    print(f"demo training photos: {len(qi)} queries, {len(di)} database images, "
          f"{args.family} descriptors of {args.weights or 'the bundled demo model'}; "
          f"first stage mAP {100 * base:.2f}")
    out = {"first_stage": base, "best": {}, "all": {}}
    for name, grid in ({} if args.skip_grids else GRIDS).items():
        t0 = time.perf_counter()
        scored = []
        for values in itertools.product(*grid.values()):
            opts = dict(zip(grid, values))
            res = registry.rerank(name, registry.Inputs(X, Q, ranks, sim), **opts)
            scored.append((sj.metrics.labelled(res.ranks, ql, dl)["mAP@all"], opts))
        best_map, best = max(scored, key=lambda t: t[0])
        out["best"][name] = {"mAP": best_map, "options": best}
        out["all"][name] = [{"mAP": m, "options": o} for m, o in scored]
        print(f"{name:9s} best {100 * best_map:6.2f} ({100 * (best_map - base):+.2f}) with "
              f"{best}; {len(scored)} settings in {time.perf_counter() - t0:.0f} s")
    if not args.skip_chamfer:
        out["best"]["chamfer"], out["all"]["chamfer"] = tune_chamfer(
            model, ts, qi, di, sim, ranks, ql, dl, base)
    if not args.skip_spatial:
        out["best"]["spatial"], out["all"]["spatial"] = tune_spatial(
            model, ts, qi, di, sim, ranks, ql, dl, base)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
