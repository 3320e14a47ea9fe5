"""Where a trained AMES stands against the training-free chamfer score over the same local
descriptors, measured on the held-out classes of its training set (never the benchmark).

    python train.py --config configs/ames_demo.py --config.ames.holdout_classes=18 --workdir W
    python benchmarks/ames_learned.py --workdir W [--json out.json]

The held-out classes' first 2 images query the rest of them (as `training.ames.tune`); the
first stage ranks by the bank's global descriptors; the top k are re-scored by
  * the first stage alone, chamfer alone, AMES alone (its logit),
  * chamfer with the first stage: lamb x sim + (1 - lamb) x chamfer,
  * AMES with the first stage: lamb x sim + (1 - lamb) x sigmoid(temp x logit),
  * all three: lamb x sim + (1 - lamb) x (mix x chamfer + (1 - mix) x sigmoid(temp x logit)),
each family's best setting of the grid reported (mAP over the whole ranking), with the mean
per-query pair AUC of each score over the top k (relevant vs not). Then what the training
loss rewards: AMES's and chamfer's separation of the three kinds of pairs the training draws
(another view of the same image, another image of the landmark, another landmark) on the
held-out images, as AUC against the other-landmark pairs.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

LAMBS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
TEMPS = (0.1, 0.2, 0.5, 0.8, 1.0, 2.0)
MIXES = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties half."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    d = np.asarray(pos, np.float64)[:, None] - np.asarray(neg, np.float64)[None, :]
    return float((d > 0).mean() + 0.5 * (d == 0).mean())


def query_auc(score: np.ndarray, rel: np.ndarray) -> float:
    """Mean over queries (columns) with both kinds in their top k of the pair AUC."""
    vals = [auc(score[rel[:, j], j], score[~rel[:, j], j]) for j in range(score.shape[1])]
    vals = [v for v in vals if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def fit_chamfer_logit(bank_dir, n: int = 3000, seed: int = 0) -> tuple[float, float]:
    """(a, c) of the logistic regression P(same landmark) = sigmoid(a x (chamfer - c)) over
    n pairs of the bank's training classes drawn as training draws them (half positives,
    half of those two views of one image; negatives hard with probability 0.5)."""
    from scvnet_jax.training.ames import Bank, pair_chamfer
    bank = Bank(bank_dir)
    lab = np.asarray(bank.labels)
    n_train = len(bank.hard)
    rng = np.random.default_rng(seed)
    x, y = [], []

    def side(i, view):
        d, length = bank.get(i, view)
        return d, np.arange(len(d)) >= length
    for _ in range(n):
        i = int(rng.integers(0, n_train))
        r = rng.random()
        vq = vd = 0
        if r < 0.25:
            j, (vq, vd), t = i, rng.choice(bank.views, 2, replace=False), 1
        elif r < 0.5:
            same = np.flatnonzero((lab[:n_train] == lab[i]) & (np.arange(n_train) != i))
            j, t = int(rng.choice(same)), 1
        else:
            row = np.asarray(bank.hard[i])
            row = row[row >= 0]
            other = np.flatnonzero(lab[:n_train] != lab[i])
            j, t = int(rng.choice(row if r < 0.75 and len(row) else other)), 0
        x.append(pair_chamfer(*side(i, int(vq)), *side(j, int(vd))))
        y.append(t)
    A = np.c_[np.asarray(x, np.float64), np.ones(len(x))]
    y = np.asarray(y, np.float64)
    w = np.zeros(2)
    for _ in range(50):                             # Newton's method
        p = 1 / (1 + np.exp(-A @ w))
        H = (A * (p * (1 - p))[:, None]).T @ A + 1e-6 * np.eye(2)
        w -= np.linalg.solve(H, A.T @ (p - y))
    return float(w[0]), float(-w[1] / w[0])


def demo_pairs(model) -> None:
    """The mean per-query pair AUC on the demo benchmark (positives easy + hard against
    the rest, junk left out, every database image scored) of the first stage's
    similarity, chamfer and the model's logit (with its chamfer term, if any)."""
    import pickle

    import scvnet_jax as sj
    from scvnet_jax.data import demo
    from scvnet_jax.engine import extract, local
    from scvnet_jax.evaluation.config import default_cache_dir
    from scvnet_jax.images import ImageRef
    from scvnet_jax.rerank import ames, chamfer

    root = Path(default_cache_dir()) / "demo_benchmark"
    demo.build_benchmark(root)
    g = pickle.loads((root / "demo" / "gnd_demo.pkl").read_bytes())
    db = [ImageRef(str(root / "demo" / "jpg" / f"{n}.jpg")) for n in g["imlist"]]
    qs = [ImageRef(str(root / "demo" / "jpg" / f"{n}.jpg"), tuple(x["bbx"]))
          for n, x in zip(g["qimlist"], g["gnd"])]
    retrieval = sj.load(sj.demo_model_path())
    st = ames.settings_of(model)
    q = local.extract_local(retrieval, qs, None, st["query_len"], dtype=np.float32)
    d = local.extract_local(retrieval, db, None, st["db_len"], dtype=np.float32)
    d16 = np.asarray(d.desc, np.float16).astype(np.float32)
    spec = extract.spec_of("superglobal")
    X = extract.extract(retrieval, db, spec)
    Q = extract.extract(retrieval, qs, spec)
    sim = np.asarray(X, np.float32) @ np.asarray(Q, np.float32).T
    ranks = np.tile(np.arange(len(db))[:, None], (1, len(qs)))
    logit = model.shortlist_logits(q.desc, q.mask, d16, d.mask, ranks)
    cham = chamfer.scores(q.desc, q.mask, d16[ranks.T], d.mask[ranks.T]).T
    logit = ames.with_chamfer(logit, cham, st["chamfer_logit"], st["chamfer_center"])
    out = {}
    for name, s in (("first stage", sim), ("chamfer", cham), ("AMES logit", logit)):
        vals = []
        for i, x in enumerate(g["gnd"]):
            pos = np.asarray(list(x["easy"]) + list(x["hard"]), int)
            neg = np.setdiff1d(np.arange(len(db)), np.concatenate([pos, x["junk"]]))
            vals.append(auc(s[pos, i], s[neg, i]))
        out[name] = float(np.mean(vals))
    print("pair AUC on the demo benchmark (per query, easy + hard against the rest): "
          + ", ".join(f"{k} {v:.3f}" for k, v in out.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True,
                   help="an ames training run's folder (ames_bank/ and model/)")
    p.add_argument("--model", default=None, help="the AMES model dir (default: WORKDIR/model)")
    p.add_argument("--k", type=int, default=100, help="images re-scored per query")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--fit", action="store_true",
                   help="print the logistic fit of the pair label on chamfer over 3000 "
                        "training pairs of the bank (ames.chamfer_logit, chamfer_center)")
    p.add_argument("--demo_pairs", action="store_true",
                   help="also the pair AUC on the demo benchmark (for a final model only)")
    args = p.parse_args(argv)

    from scvnet_jax import files, metrics
    from scvnet_jax.errors import InputError
    from scvnet_jax.rerank import ames, chamfer
    from scvnet_jax.training.ames import heldout_split

    work = Path(args.workdir).expanduser()
    model_dir = Path(args.model).expanduser() if args.model else work / "model"
    bank_dir = work / "ames_bank"
    if args.k < 1:
        raise InputError(f"--k {args.k}: expected an integer >= 1 (images re-scored)")
    if not (bank_dir / "done.json").exists():
        raise InputError(f"{bank_dir}: no complete AMES bank (train.py's ames stage writes it)")
    if args.fit:
        a, c = fit_chamfer_logit(bank_dir)
        print(f"logistic fit on the training pairs: chamfer_logit {a:.1f}, chamfer_center "
              f"{c:.3f}")
        return 0
    held = int(json.loads((bank_dir / "key.json").read_text()).get("holdout_classes", 0))
    if held < 1 and not args.demo_pairs:
        raise InputError(f"{bank_dir}/key.json: holdout_classes = {held}; this needs a run "
                         "trained with --config.ames.holdout_classes >= 1 (or --demo_pairs)")
    model = ames.load(model_dir)
    if args.demo_pairs:
        demo_pairs(model)
    if held < 1:
        return 0
    labels_all = np.load(bank_dir / "labels.npy")
    offsets = np.r_[0, np.flatnonzero(np.diff(labels_all)) + 1, len(labels_all)]
    h = heldout_split(bank_dir, int(offsets[len(offsets) - 1 - held]))
    bank, idx, labels, qi, di = h.bank, h.idx, h.labels, h.qi, h.di
    ranks, sims, desc, mask = h.ranks, h.sims, h.desc, h.mask

    def stack(view):
        vs = [bank.get(int(i), view) for i in idx]
        d = np.stack([v.astype(np.float32) for v, _ in vs])
        return d, np.arange(d.shape[1])[None, :] >= np.array([n for _, n in vs])[:, None]

    kk = min(args.k, len(di))
    top = ranks[:kk]                                                 # (kk, nq)
    logit = model.shortlist_logits(desc[qi], mask[qi], desc[di], mask[di], top)
    cham = chamfer.scores(desc[qi], mask[qi], desc[di][top.T], mask[di][top.T]).T
    st = ames.settings_of(model)        # a model trained on top of chamfer: its logit
    ca, cc = st["chamfer_logit"], st["chamfer_center"]
    logit = ames.with_chamfer(logit, cham, ca, cc)
    ql, dl = labels[qi], labels[di]
    rel = dl[top] == ql[None, :]

    def rerank_map(s):
        order = np.argsort(-s, axis=0, kind="stable")
        r = ranks.copy()
        r[:kk] = np.take_along_axis(r[:kk], order, axis=0)
        return metrics.labelled(r, ql, dl)["mAP@all"]

    rows = []

    def family(name, grid, score_of):
        best = None
        for opts in grid:
            s = score_of(**opts)
            m = rerank_map(s)
            if best is None or m > best[0] + 1e-12:
                best = (m, opts, s)
        m, opts, s = best
        rows.append({"score": name, "mAP": m, "options": opts, "pair_auc": query_auc(s, rel)})

    ts = sims[:kk]
    family("first stage", [{}], lambda: ts)
    family("chamfer alone", [{}], lambda: cham)
    family("AMES alone", [{}], lambda: logit)
    family("chamfer + first stage", [{"lamb": lb} for lb in LAMBS],
           lambda lamb: lamb * ts + (1 - lamb) * cham)
    family("AMES + first stage", [{"lamb": lb, "temp": t} for lb, t in
                                  itertools.product(LAMBS, TEMPS)],
           lambda lamb, temp: lamb * ts + (1 - lamb) * sigmoid(temp * logit))
    family("AMES + chamfer + first stage",
           [{"lamb": lb, "temp": t, "mix": mx} for lb, t, mx in
            itertools.product(LAMBS, TEMPS, MIXES)],
           lambda lamb, temp, mix: lamb * ts + (1 - lamb) * (
               mix * cham + (1 - mix) * sigmoid(temp * logit)))

    print(f"{model_dir}" + (f" (trained on top of chamfer: logit + {ca:g} x (chamfer - "
                            f"{cc:g}))" if ca else ""))
    print(f"held-out classes: {held} ({len(qi)} queries, {len(di)} database images), "
          f"top {kk} of the first stage re-scored; mAP % over the whole ranking")
    print(f"{'score':32s} {'mAP':>6s} {'pair AUC':>8s}  setting")
    for r in rows:
        print(f"{r['score']:32s} {100 * r['mAP']:6.2f} {r['pair_auc']:8.3f}  "
              + (", ".join(f"{k} {v}" for k, v in r["options"].items()) or "-"))

    # what the loss rewards: the three kinds of training pairs on the held-out images
    kinds = {"same image (another view)": [], "same landmark": [], "other landmark": []}
    pairs = []
    rng = np.random.default_rng(0)
    for a in range(len(idx)):
        for v in range(1, bank.views):
            pairs.append((a, ("view", v), "same image (another view)"))
        same = np.flatnonzero((labels == labels[a]) & (np.arange(len(idx)) != a))
        other = np.flatnonzero(labels != labels[a])
        for b in rng.choice(same, min(3, len(same)), replace=False):
            pairs.append((a, ("img", int(b)), "same landmark"))
        for b in rng.choice(other, 3, replace=False):
            pairs.append((a, ("img", int(b)), "other landmark"))
    view_stacks = {v: stack(v) for v in range(1, bank.views)}
    qd = desc[[a for a, _, _ in pairs]]
    qm = mask[[a for a, _, _ in pairs]]
    dd = np.stack([view_stacks[t[1]][0][a] if t[0] == "view" else desc[t[1]]
                   for a, t, _ in pairs])
    dm = np.stack([view_stacks[t[1]][1][a] if t[0] == "view" else mask[t[1]]
                   for a, t, _ in pairs])
    lg = model.similarity(qd, qm, dd, dm)
    ch = chamfer.scores(qd, qm, dd[:, None], dm[:, None])[:, 0]
    lg = ames.with_chamfer(lg, ch, ca, cc)
    kind = np.array([k for _, _, k in pairs])
    neg = kind == "other landmark"
    loss_rows = []
    print("\nthe training's pair kinds on the held-out images (AUC against other-landmark "
          "pairs; mean score)")
    print(f"{'pairs':28s} {'n':>5s} {'AMES AUC':>8s} {'chamfer AUC':>11s} {'AMES logit':>10s} "
          f"{'chamfer':>7s}")
    for k in kinds:
        sel = kind == k
        row = {"pairs": k, "n": int(sel.sum()), "ames_auc": auc(lg[sel], lg[neg]),
               "chamfer_auc": auc(ch[sel], ch[neg]), "ames_logit": float(lg[sel].mean()),
               "chamfer": float(ch[sel].mean())}
        loss_rows.append(row)
        print(f"{k:28s} {row['n']:5d} {row['ames_auc']:8.3f} {row['chamfer_auc']:11.3f} "
              f"{row['ames_logit']:10.2f} {row['chamfer']:7.3f}")
    if args.json:
        files.atomic_write_text(Path(args.json), json.dumps({"heldout_classes": held, "queries": len(qi),
                                               "database": len(di), "k": kk, "rows": rows,
                                               "pair_kinds": loss_rows}, indent=1))
    return 0


if __name__ == "__main__":
    from scvnet_jax.cli import run
    sys.exit(run(main))               # a ScvnetError: one `error:` line, exit status 2
