"""Evaluate CVNet / SuperGlobal retrieval on the revisited Oxford and Paris benchmarks.

    python eval.py --dataset demo          # the bundled demo model and benchmark, no download
    python eval.py --dataset roxford5k --data_dir DATA --weights CVPR2022_CVNet_R50.pyth

DATA follows the revisitop layout: DATA/roxford5k/gnd_roxford5k.pkl and DATA/roxford5k/jpg/.
Runs the pipelines cvnet_global, cvnet_rerank, superglobal_global and superglobal_rerank
(exactly as the official CVNet and SuperGlobal test scripts), prints mAP and mP@k per
pipeline, and writes results.json plus results_ranks.npz beside it. Descriptors are cached
(see --cache_dir), so an interrupted run resumes where it stopped.

Protocols (CVNet reranking only; the other pipelines never look at labels):
  official  what the official CVNet test does: per query and per Easy/Medium/Hard setting it
            reranks the first top-k images that the setting does not ignore, so the ground
            truth picks what is reranked (three rankings). For reproducing published numbers.
  blind     reranks the plain top-k: what your own data needs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

USAGE_EXAMPLES = """examples:
  python eval.py --dataset demo
  python eval.py --dataset demo --weights random
  python eval.py --dataset roxford5k --data_dir DATA --weights CVPR2022_CVNet_R50.pyth
  python eval.py --config configs/eval_minirevisit.py --weights r50.pyth --topk 10
  python eval.py --dataset rparis6k --data_dir DATA --weights converted/cvnet_r101 \\
      --pipelines superglobal_global,superglobal_rerank --distractors DATA/revisitop1m/revisitop1m.txt
"""


def parse_args(argv):
    from scvnet_jax.evaluation.pipelines import PIPELINES

    p = argparse.ArgumentParser(
        prog="eval.py", description=__doc__, epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", help="a config file with get_config() (e.g. configs/eval_revisitop.py); "
                       "the flags below override its fields")
    a("--dataset", choices=("roxford5k", "rparis6k", "demo"),
      help="benchmark (default: roxford5k); 'demo' = the demo benchmark (generated from "
           "photographs shipped with scikit-image) with the bundled demo model")
    a("--data_dir", help="folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/ "
                         "(demo: default <cache_dir>/demo_benchmark, built on first use)")
    a("--weights", help="official CVNet checkpoint (.pyth/.pth), a model directory (written by "
                        "`python -m scvnet_jax.convert` or train.py), or 'random': an "
                        "untrained model of the default model's shape (demo: the bundled "
                        "demo model's; else the official R50's), seed 0. Default for demo: "
                        "the bundled demo model")
    a("--pipelines", help="comma list of " + ", ".join(PIPELINES) + " (default: all four)")
    a("--topk", type=int, help="CVNet rerank depth (default: 100)")
    a("--protocol", choices=("official", "blind"),
      help="CVNet rerank protocol (default: official; see above)")
    a("--distractors", help="revisitop 1M distractor list (revisitop1m.txt) to add to the "
                            "database (+R1M)")
    a("--distractors_dir", help="folder the distractor paths are relative to (default: the "
                                "list's folder)")
    a("--output", help="results JSON (default: results.json); ranks go to <stem>_ranks.npz")
    a("--cache_dir", help="descriptor cache (default: ~/.cache/scvnet_jax); '' disables it")
    a("--save_visuals", metavar="DIR", help="write one PNG per query: the query crop and its "
                                            "top-10 per pipeline, bordered by label")
    a("--dtype", choices=("float32", "bfloat16"),
      help="backbone compute dtype (default float32: parity with the official code)")
    a("--batch_size", type=int, help="images per batch (default: 8)")
    a("--bucket", type=int, help="pad image sizes up to multiples of this many pixels so that "
                                 "one compilation serves many sizes; results are unchanged "
                                 "(default: 64; 1 = exact sizes)")
    a("--feature_bucket", type=int, help="likewise for local-feature sizes when scoring CVNet "
                                         "rerank pairs, in feature cells (default: 4)")
    a("--workers", type=int, help="image-decoding threads (default: 4)")
    return p.parse_args(argv)


def build_config(args):
    from scvnet_jax.evaluation.config import default_config, demo_config

    if args.config:
        from scvnet_jax.config_files import load_config
        cfg = load_config(args.config)
    elif args.dataset == "demo":
        cfg = demo_config()
    else:
        cfg = default_config()
    for name in ("dataset", "data_dir", "weights", "distractors", "distractors_dir", "output",
                 "cache_dir", "save_visuals", "dtype", "batch_size", "bucket", "feature_bucket",
                 "workers"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if args.pipelines is not None:
        cfg.pipelines = [s.strip() for s in args.pipelines.split(",") if s.strip()]
    if args.topk is not None:
        cfg.cvnet.topk = args.topk
    if args.protocol is not None:
        cfg.cvnet.protocol = args.protocol
    return cfg


def load_model(weights: str, dataset: str, dtype):
    """The model to evaluate; 'random' = untrained, shaped like the dataset's default model."""
    import scvnet_jax as sj

    if weights != "random":
        return sj.load(weights, dtype=dtype)
    arch = {}                    # sj.create's defaults: the official R50
    if dataset == "demo":
        from scvnet_jax.convert import model_dir
        arch = model_dir.read_config(sj.demo_model_path())["arch"]
    return sj.create(**arch, seed=0, dtype=dtype)


def run(cfg) -> int:
    import jax.numpy as jnp

    import scvnet_jax as sj
    from scvnet_jax.data.revisitop import InputError, load_dataset, read_distractor_list
    from scvnet_jax.evaluation import pipelines, report, visuals

    if cfg.dataset == "demo":
        from scvnet_jax.data import demo
        from scvnet_jax.evaluation.config import default_cache_dir
        if not cfg.data_dir:
            cfg.data_dir = os.path.join(cfg.cache_dir or default_cache_dir(), "demo_benchmark")
        demo.build_benchmark(cfg.data_dir)    # a few seconds, once
        if not cfg.weights:
            cfg.weights = str(sj.demo_model_path())
    if not cfg.data_dir:
        raise InputError("--data_dir is required (the folder holding "
                         f"{cfg.dataset}/gnd_{cfg.dataset}.pkl)")
    if not cfg.weights:
        raise sj.CheckpointError("--weights is required (an official .pyth/.pth or a converted "
                                 "model directory, or 'random')")
    t0 = time.time()
    import jax
    if cfg.cache_dir and not jax.config.jax_compilation_cache_dir:
        # Compiled programs are reused by later runs too (JAX_COMPILATION_CACHE_DIR wins).
        jax.config.update("jax_compilation_cache_dir", os.path.join(cfg.cache_dir, "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    dataset = load_dataset(cfg.data_dir, cfg.dataset)
    distractors = (read_distractor_list(cfg.distractors, cfg.distractors_dir or None)
                   if cfg.distractors else None)
    model = load_model(cfg.weights, cfg.dataset, jnp.dtype(cfg.dtype))
    n_db = dataset.n_db + len(distractors or [])
    print(f"{dataset.name}: {dataset.n_queries} queries, {n_db} database images"
          f"{f' ({len(distractors)} distractors)' if distractors else ''}; "
          f"weights {cfg.weights} (R{model.depth}, {cfg.dtype}); "
          f"pipelines {', '.join(cfg.pipelines)}; CVNet rerank top-{cfg.cvnet.topk}, "
          f"protocol {cfg.cvnet.protocol}", flush=True)
    results = pipelines.evaluate(cfg, model, dataset, distractors)
    meta = {"dataset": dataset.name + ("+R1M" if distractors else ""),
            "n_queries": dataset.n_queries, "n_db": n_db, "weights": str(cfg.weights),
            "dtype": cfg.dtype}
    print()
    print(report.table(results, cfg.ks, f"{meta['dataset']} results (percent):"))
    extra = {"cvnet_rerank": {"topk": cfg.cvnet.topk, "mix": cfg.cvnet.mix},
             "superglobal_rerank": dict(cfg.superglobal.rerank)}
    out, ranks = report.write(results, cfg.ks, meta, cfg.output, extra)
    print(f"wrote {out} and {ranks} in {time.time() - t0:.0f} s")
    if cfg.save_visuals:
        paths = visuals.save_all(cfg.save_visuals, results, dataset.query_images(),
                                 dataset.db_images() + list(distractors or []), dataset.gnd,
                                 dataset.qimlist, cfg.visuals_topn)
        print(f"wrote {len(paths)} result grids to {cfg.save_visuals}")
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from scvnet_jax import CheckpointError
    from scvnet_jax.data.revisitop import InputError

    cfg = build_config(args)
    try:
        return run(cfg)
    except (InputError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished chunks are cached, run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
