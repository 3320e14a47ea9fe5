"""Every reranker of the registry on the demo benchmark: mAP (Easy / Medium / Hard) and
milliseconds per query, warm (each reranker runs once to compile, then is timed).

    python benchmarks/rerankers.py                               # the bundled demo model
    python benchmarks/rerankers.py --csa_weights runs/csa_demo/model --json out.json

Settings are configs/eval_demo.py's (the training-free rerankers' were chosen on the demo
training photos, see benchmarks/tune_rerankers.py). The first stages are eval.py's
(cvnet_global for the CVNet verifier, superglobal_global for the others); the CVNet
verifier runs the blind protocol here (the official one picks what to rerank with the
labels) on the top 100, its time including the local features of the query and of the
100 candidates (at most 210 database images: each computed once for all queries); so
do chamfer's and spatial's (blind here too, their descriptors not cached).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="a model (default: the bundled demo model)")
    p.add_argument("--csa_weights", default=None, help="a CSA model (else csa is skipped)")
    p.add_argument("--cache_dir", default=None, help="descriptor cache (eval.py's default)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import jax

    import scvnet_jax as sj
    from scvnet_jax.configs import eval_demo
    from scvnet_jax.data import demo
    from scvnet_jax.data.revisitop import load_dataset
    from scvnet_jax.engine import extract, search
    from scvnet_jax.evaluation.config import default_cache_dir
    from scvnet_jax.rerank import registry

    cfg = eval_demo.get_config()
    cache_dir = args.cache_dir or default_cache_dir()
    data_dir = demo.build_benchmark(f"{cache_dir}/demo_benchmark").parent
    ds = load_dataset(data_dir, "demo")
    model = sj.load(args.weights or sj.demo_model_path())
    kw = dict(batch_size=cfg.batch_size, bucket=cfg.bucket, chunk_size=cfg.chunk_size)
    first = {}
    for family, name in (("cvnet", "cvnet_global"), ("superglobal", "superglobal_global")):
        spec = extract.spec_of(family)
        X = extract.extract(model, ds.db_images(), spec, desc=f"{family} db", **kw)
        Q = extract.extract(model, ds.query_images(), spec, desc=f"{family} query", **kw)
        sim, ranks = search.rank(X, Q)
        first[name] = (X, Q, sim, ranks)
    rows = [{"pipeline": name, "mAP": sj.metrics.revisitop(first[name][3], ds.gnd)[:3],
             "ms_per_query": None} for name in first]
    settings = {"superglobal": dict(cfg.superglobal.rerank),
                "cvnet": {"topk": cfg.cvnet.topk, "mix": cfg.cvnet.mix, "protocol": "blind"},
                "icfrr": dict(cfg.icfrr), "alpha_qe": dict(cfg.alpha_qe), "dba": dict(cfg.dba),
                "csa": {**dict(cfg.csa), "weights": args.csa_weights or ""},
                "chamfer": {**dict(cfg.chamfer), "protocol": "blind"},
                "spatial": {**dict(cfg.spatial), "protocol": "blind"}}
    for name in registry.names():
        if name == "csa" and not args.csa_weights:
            print("csa: skipped (no --csa_weights)")
            continue
        if name not in settings:        # ames: benchmarks/ames.py
            print(f"{name}: skipped (see its own benchmark)")
            continue
        stage = "cvnet_global" if name == "cvnet" else "superglobal_global"
        X, Q, sim, ranks = first[stage]
        inputs = registry.Inputs(X, Q, ranks, sim, model=model,
                                 query_images=ds.query_images(), db_images=ds.db_images(),
                                 settings={"batch_size": cfg.batch_size, "bucket": cfg.bucket,
                                           "feature_bucket": cfg.feature_bucket})
        registry.rerank(name, inputs, **settings[name])             # compiles
        t0 = time.perf_counter()
        out = registry.rerank(name, inputs, **settings[name])
        ms = 1000 * (time.perf_counter() - t0) / len(Q)
        rows.append({"pipeline": f"{name} (on {stage})", "ms_per_query": ms,
                     "mAP": sj.metrics.revisitop(out.ranks, ds.gnd)[:3],
                     "options": {k: v for k, v in settings[name].items() if k != "weights"}})
    dev = jax.devices()[0]
    print(f"demo benchmark: {len(Q)} queries, {len(X)} database images; "
          f"{args.weights or 'bundled demo model'}; device {dev.platform} "
          f"({platform.processor() or platform.machine()})")
    print(f"{'pipeline':34s} {'E':>6s} {'M':>6s} {'H':>6s} {'ms/query':>9s}")
    for r in rows:
        e, m, h = (100 * v for v in r["mAP"])
        t = "" if r["ms_per_query"] is None else f"{r['ms_per_query']:9.1f}"
        print(f"{r['pipeline']:34s} {e:6.2f} {m:6.2f} {h:6.2f} {t}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**r, "mAP": [float(v) for v in r["mAP"]]} for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
