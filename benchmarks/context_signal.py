"""How much *contextual* signal does a model's global descriptor carry on the demo data?
Measured on the demo *training* photos, never on the benchmark.

    python benchmarks/context_signal.py                       # the bundled demo model
    python benchmarks/context_signal.py --weights runs/demo/model --family cvnet --json c.json

Contextual rerankers (alpha-QE, DBA, ICFRR, SuperGlobal's reranker, CSA) re-score a
query's top k from the candidates' similarities to each other. They can only help where
that context separates relevant candidates from the rest. This script builds views of every
demo training tile with the held-out benchmark's recipe (`demo.instance_views`: a query,
3 easy, 3 hard and 1 junk view per tile, another seed), so a query's top k holds the
tiles of its own photograph as the benchmark's does, and scores the revisited protocol's
Easy / Medium / Hard mAP of:

  * the first stage (the family's descriptor, as eval.py computes it);
  * alpha-QE and DBA (`sj.rerank`) at the settings tuned on the training photos
    (configs/eval_demo.py);
  * three training-free context scores on the top k, added to the first-stage similarity
    with a small weight: `qe` (the mean similarity to the top m, weighted by their
    similarity to the query), `recip` (minus the share of the query's top k a candidate
    prefers to the query), `zrow` (how far the query stands out in the candidate's row of
    affinities, the features CSA reads, in standard deviations);
  * for reference, a *local* similarity over the same top k: the mean over the query's
    64 strongest local descriptors of their best cosine in the candidate (chamfer).

If no context score gains more than a fraction of a point, a learned contextual reranker
has little to learn from these descriptors (README, "Rerankers": CSA on the demo).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def views(seed: int):
    """(db images, query images, gnd) of benchmark-recipe views of every training tile."""
    from scvnet_jax.data import demo
    photos = demo.read_photos(demo.TRAIN_PHOTOS)
    db, queries, owner = [], [], []
    for label, inst in enumerate(demo.train_instances()):
        rng = np.random.default_rng([seed, label])
        v, q = demo.instance_views(photos, inst, rng)
        queries.append(q)
        for kind, _ in demo.BENCHMARK_KINDS:
            db += v[kind]
            owner += [(label, kind)] * len(v[kind])
    gnd = [{k: np.array([d for d, (lab, kk) in enumerate(owner) if lab == i and kk == k])
            for k, _ in demo.BENCHMARK_KINDS} for i in range(len(queries))]
    return db, queries, gnd


def rescore(S, ranks, k: int, extra) -> np.ndarray:
    """Ranking by S (nq, N) + extra(q, top) on each query's top k (the rest unchanged)."""
    S = S.copy()
    for q in range(S.shape[0]):
        top = ranks[:k, q]
        S[q, top] = S[q, top] + extra(q, top)
    out = ranks.copy()
    out[:k] = np.take_along_axis(ranks[:k].T, np.argsort(-np.take_along_axis(
        S, ranks[:k].T, 1), 1, kind="stable"), 1).T
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="demo", help="a model directory, an official "
                    "checkpoint, or 'demo' (the bundled demo model)")
    ap.add_argument("--family", default="superglobal", choices=("cvnet", "superglobal"))
    ap.add_argument("--topk", type=int, default=32, help="the top k re-scored (csa_demo's)")
    ap.add_argument("--seed", type=int, default=777, help="the views' seed (the benchmark's "
                    "is another; training views are yet others)")
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args(argv)
    if args.topk < 2:
        print(f"error: --topk {args.topk}: expected an integer >= 2", file=sys.stderr)
        return 2

    import scvnet_jax as sj
    from tqdm import tqdm
    from scvnet_jax import metrics
    from scvnet_jax.engine import extract, local, search
    from scvnet_jax.errors import ScvnetError

    try:
        model = sj.load(sj.demo_model_path() if args.weights == "demo" else args.weights)
    except ScvnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    db, qs, gnd = views(args.seed)
    spec = extract.spec_of(args.family)
    with tqdm(total=len(db) + len(qs), desc=args.family, unit="img") as bar:
        X = extract.describe_images(model, db, spec, 16, 64, bar)
        Q = extract.describe_images(model, qs, spec, 16, 64, bar)
    sim, ranks = search.rank(X, Q)
    S = sim.T
    k = min(args.topk, X.shape[0])
    G = X @ X.T

    def qe(m, lam):
        return lambda q, top: lam * (G[top][:, ranks[:m, q]] @ S[q, ranks[:m, q]]) / m

    def recip(lam):
        return lambda q, top: -lam * (G[np.ix_(top, top)] > S[q, top][:, None]).sum(1) / k

    def zrow(lam):
        def f(q, top):
            anchors = G[np.ix_(top, top[:-1])]           # as CSA: the query + top k-1
            return lam * (S[q, top] - anchors.mean(1)) / (anchors.std(1) + 1e-6)
        return f

    rows = {"first stage": ranks}
    rows["alpha-QE (k 2, alpha 1)"] = sj.rerank.alpha_qe(X, Q, ranks, k=2, alpha=1.0)
    Xd = sj.rerank.dba(X, k=2, alpha=1.0)
    rows["DBA (k 2, alpha 1)"] = search.rank(Xd, Q)[1]
    for m, lam in ((3, 0.5), (5, 0.2), (5, 1.0)):
        rows[f"qe m {m}, weight {lam}"] = rescore(S, ranks, k, qe(m, lam))
    for lam in (0.01, 0.03, 0.1):
        rows[f"recip, weight {lam}"] = rescore(S, ranks, k, recip(lam))
    for lam in (0.01, 0.03, 0.1):
        rows[f"zrow, weight {lam}"] = rescore(S, ranks, k, zrow(lam))
    with tqdm(total=len(db) + len(qs), desc="local", unit="img") as bar:
        Lx = local.describe_local(model, db, topk=64, dtype=np.float32, bar=bar)
        Lq = local.describe_local(model, qs, topk=64, dtype=np.float32, bar=bar)

    def unit_rows(lf):
        d = lf.desc.astype(np.float32)
        d = d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-6)
        return np.where(lf.mask[..., None], 0.0, d), ~lf.mask

    (dx, mx), (dq, mq) = unit_rows(Lx), unit_rows(Lq)

    def chamfer(q, top):
        C = np.einsum("ad,nbd->nab", dq[q], dx[top])
        C = np.where(mx[top][:, None, :], C, -2.0).max(2)
        return (C * mq[q]).sum(1) / mq[q].sum() - S[q, top]     # replaces the similarity
    rows[f"chamfer (local, top {k})"] = rescore(S, ranks, k, chamfer)

    table = {}
    for name, r in rows.items():
        e, m, h, _ = metrics.revisitop(r, gnd)
        table[name] = [round(100 * v, 2) for v in (e, m, h)]
    first = table["first stage"][1]
    print(f"\n{args.family} descriptors of {args.weights}: {len(qs)} queries, {len(db)} "
          f"database views of the demo training tiles (seed {args.seed}), top {k}; "
          f"{time.perf_counter() - t0:.0f} s\n")
    print(f"| {'scores':<26} | Easy  | Medium | Hard  | Medium gain |")
    print(f"|{'-' * 28}|-------|--------|-------|-------------|")
    for name, (e, m, h) in table.items():
        print(f"| {name:<26} | {e:5.2f} | {m:6.2f} | {h:5.2f} | {m - first:+11.2f} |")
    if args.json:
        from scvnet_jax import files
        files.atomic_write_text(args.json, json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
