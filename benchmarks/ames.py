"""AMES re-ranking speed: pairs/s and ms per query for top-k re-ranking, ours (JAX) against
the official AMES code (PyTorch) in the same run, same weights, outputs compared.

    python benchmarks/ames.py                                  # ours only
    python benchmarks/ames.py --official ~/src/ames            # + the official model
    python benchmarks/ames.py --official ~/src/ames --json ames_speed.json

--official: a checkout of github pavelsuma/ames (its src/models is imported; needs torch).
Without it (or without torch) the official columns are skipped with a message.

Sizes: "r101" is the released CVNet-R101 AMES (1024-d descriptors, model 128, 5 layers,
2 heads, feed-forward 1024) with the authors' README lengths: 600 descriptors per query,
50 per database image, the top 100 re-ranked; "demo" is configs/ames_demo.py's model on
the demo lengths. Both variants (fp, dist). Random weights and descriptors (the cost does
not depend on the values). Ours reads the database as the token store holds it (float16
tokens, packed bits for dist) and scores `--batch` pairs per call in one compiled shape;
the official model is fed batches of the same size, as its evaluate() does (float32 local
descriptors, eval mode, torch.no_grad). Both sides use every core of the machine unless
--threads is given.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _demo_size() -> dict:
    """configs/ames_demo.py's model on the demo model's 256-d descriptors (read from the
    config, so the benchmark follows it)."""
    from scvnet_jax.configs import ames_demo
    a = ames_demo.get_config().ames
    return dict(local_dim=256, model_dim=int(a.model_dim), nhead=int(a.nhead),
                num_encoder_layers=int(a.num_encoder_layers),
                dim_feedforward=int(a.dim_feedforward), query_len=int(a.topk),
                db_len=int(a.topk))


SIZES = {
    "r101": dict(local_dim=1024, model_dim=128, nhead=2, num_encoder_layers=5,
                 dim_feedforward=1024, query_len=600, db_len=50),
    "demo": _demo_size(),
}


def official_model(path: Path, arch: dict, binarized: bool, state_dict: dict, tmp: Path):
    """The official AMES (src/models/matcher.py) with our weights loaded, eval mode."""
    import torch
    sys.path.insert(0, str(path / "src"))
    try:
        from models.matcher import AMES
    finally:
        sys.path.pop(0)
    if binarized:      # the constructor reads its projection from this file
        (tmp / "networks").mkdir(exist_ok=True)
        np.savez(tmp / "networks" / "itq_dinov2_D128.npz",
                 proj=state_dict["remap_local.0.W"])
    m = AMES(data_root=str(tmp), local_dim=arch["local_dim"], model_dim=arch["model_dim"],
             nhead=arch["nhead"], num_encoder_layers=arch["num_encoder_layers"],
             dim_feedforward=arch["dim_feedforward"], activation="relu",
             normalize_before=False, binarized=binarized)
    m.load_state_dict({k: torch.from_numpy(np.array(v))
                       for k, v in state_dict.items()}, strict=True)
    return m.eval()


def compare(size: str, variant: str, queries: int, k: int, batch: int,
            official: str | None = None, seed: int = 0) -> dict:
    """One row: our shortlist scoring of `queries` x top-`k` pairs of model `size` ("demo",
    "r101") and `variant` ("fp", "dist"), timed after a compiling run, and with `official`
    (a checkout; torch importable) the official model on the same pairs in batches of
    `batch`, its time and the largest logit difference."""
    import jax
    from scvnet_jax.models.ames import AMESArch, init
    from scvnet_jax.rerank import ames

    rng = np.random.default_rng(seed)
    s = SIZES[size]
    binarized = variant == "dist"
    arch = AMESArch(**{a: v for a, v in s.items() if a not in ("query_len", "db_len")},
                    binarized=binarized)
    model = ames.AMESReranker(arch, jax.tree.map(np.asarray, init(arch, 0)))
    nq, n_db = queries, max(k, 200)
    q = rng.normal(size=(nq, s["query_len"], s["local_dim"])).astype(np.float32)
    d = rng.normal(size=(n_db, s["db_len"], s["local_dim"])).astype(np.float32)
    qm = np.zeros(q.shape[:2], bool)
    dm = np.zeros(d.shape[:2], bool)
    ranks = np.stack([rng.permutation(n_db)[:k] for _ in range(nq)], axis=1)
    store = model.db_tokens(d, dm)
    fmt = "tokens"
    if binarized:
        store, fmt = ames.pack_codes(store), "packed"
    kw = dict(db_format=fmt, batch_size=batch)
    model.shortlist_logits(q, qm, store, dm, ranks, **kw)                     # compile
    t0 = time.perf_counter()
    ours = model.shortlist_logits(q, qm, store, dm, ranks, **kw)
    t_ours = time.perf_counter() - t0
    row = {"size": size, "variant": variant, "query_len": s["query_len"],
           "db_len": s["db_len"], "pairs": nq * k, "k": k,
           "ours_pairs_per_s": nq * k / t_ours, "ours_ms_per_query": 1e3 * t_ours / nq,
           "bytes_per_db_image": ames.bytes_per_image(model, s["db_len"]),
           "official_bytes_per_db_image": 700 * (5 + s["local_dim"]) * 4}
    if official is None:
        return row
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        om = official_model(Path(official), s, binarized, model.state_dict(), Path(tmp))
        out = np.empty((nq, k), np.float32)

        def run_official():
            with torch.no_grad():
                for i in range(nq):
                    for b in range(0, k, batch):
                        idx = ranks[b:b + batch, i]
                        n = len(idx)
                        src = torch.from_numpy(np.repeat(q[i:i + 1], n, 0))
                        sm = torch.from_numpy(np.repeat(qm[i:i + 1], n, 0))
                        out[i, b:b + n] = om(src, sm, torch.from_numpy(d[idx]),
                                             torch.from_numpy(dm[idx])).numpy()
        run_official()                                                        # warm-up
        t0 = time.perf_counter()
        run_official()
        t_off = time.perf_counter() - t0
    row.update(official_pairs_per_s=nq * k / t_off, official_ms_per_query=1e3 * t_off / nq,
               ratio=t_off / t_ours, max_abs_logit_diff=float(np.abs(out.T - ours).max()))
    return row


def line_of(row: dict) -> str:
    line = (f"{row['size']:5s} {row['variant']:4s} q{row['query_len']}/db{row['db_len']}: ours "
            f"{row['ours_pairs_per_s']:8.1f} pairs/s, {row['ours_ms_per_query']:8.1f} "
            f"ms/query (top {row['k']})")
    if "ratio" in row:
        line += (f"; official {row['official_pairs_per_s']:8.1f} pairs/s, "
                 f"{row['official_ms_per_query']:8.1f} ms/query; ratio "
                 f"{row['ratio']:.2f}x; max |logit diff| {row['max_abs_logit_diff']:.1e}")
    return line + (f"; store {row['bytes_per_db_image']} B/db image (the official hdf5: "
                   f"700 rows, {row['official_bytes_per_db_image']} B)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", default=None, help="a checkout of github pavelsuma/ames")
    p.add_argument("--sizes", default="demo,r101", help="comma list of " + ", ".join(SIZES))
    p.add_argument("--variants", default="fp,dist", help="fp, dist or both")
    p.add_argument("--queries", type=int, default=4, help="queries timed (each with --k)")
    p.add_argument("--k", type=int, default=100, help="database images re-ranked per query")
    p.add_argument("--batch", type=int, default=100, help="pairs per call (both sides)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import jax

    torch = None
    if args.official:
        try:
            import torch
        except ImportError:
            print("official: skipped (torch is not installed)")
        if torch is not None and not (Path(args.official) / "src/models/matcher.py").is_file():
            print(f"official: skipped ({args.official} has no src/models/matcher.py)")
            torch = None
        if torch is not None:
            torch.set_num_threads(args.threads or os.cpu_count())
    else:
        print("official: skipped (no --official checkout given)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}"
          + (f"; torch {torch.__version__}, {torch.get_num_threads()} threads" if torch else ""))

    rows = []
    for size in args.sizes.split(","):
        for variant in args.variants.split(","):
            row = compare(size, variant, args.queries, args.k, args.batch,
                          args.official if torch is not None else None)
            rows.append(row)
            print(line_of(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
