"""Evaluate CVNet / SuperGlobal retrieval on the revisited Oxford and Paris benchmarks, GLDv2's
retrieval benchmark (mAP@100) or the held-out part of your own photos.

    python -m scvnet_jax.eval --dataset demo      # the bundled demo model and benchmark
    python -m scvnet_jax.eval --dataset roxford5k --data_dir DATA --weights CVPR2022_CVNet_R50.pyth
    python -m scvnet_jax.eval --config configs/eval_revisitop.py --config.cvnet.topk=10 ...

(`python eval.py ...` in a checkout is the same.) DATA follows the revisitop layout:
DATA/roxford5k/gnd_roxford5k.pkl and DATA/roxford5k/jpg/. `--dataset gldv2_retrieval
--data_dir D` reads what `python -m scvnet_jax.data.build gldv2_retrieval` wrote into D
(rows public and private); `--dataset folder:D/NAME` the held-out split of a set built by
`python -m scvnet_jax.data.build folder` (one setting, "all": no hard or junk labels).
Runs the pipelines cvnet_global, cvnet_rerank, superglobal_global and superglobal_rerank
(exactly as the official CVNet and SuperGlobal test scripts), prints mAP and mP@k per
pipeline, and writes results/<dataset>/results.json plus results_ranks.npz beside it
(--output). Descriptors are cached (see --cache_dir), so an interrupted run resumes where
it stopped.

Settings come from an ml_collections config (--config; default: configs/eval_revisitop.py,
or configs/eval_demo.py with --dataset demo; any field can be set with
--config.<field>=<value>); the flags below set the common fields and win over --config.*.

Every reranker of the registry (scvnet_jax/rerank/registry.py) is a pipeline: those of the
official test scripts on their own first stage, the others on a chosen first stage
(--first_stage, default superglobal_global), selected with --pipelines and set with
--config.<section>.<option> (the rerankers and their options are listed at the end).
results.json records each one's options, first stage and reranking time
(rerank_ms_per_query).

Protocols (of the rerankers that read labels; the other pipelines never look at them):
  official  what the official CVNet test does: per query and per Easy/Medium/Hard setting it
            reranks the first top-k images that the setting does not ignore, so the ground
            truth picks what is reranked (three rankings). For reproducing published numbers.
            AMES (the authors' evaluate()): each query's shortlist has its junk (Medium),
            resp. junk + easy (Hard) images moved to its end before the top k is reranked.
  blind     reranks the plain top-k: what your own data needs.

Devices: every batch is split over all of this process's devices. On several hosts (a TPU
slice, a multi-node GPU cluster) run the same command on every host with --distributed:
each process extracts its share of the images and all gather the descriptors.

examples:
  python -m scvnet_jax.eval --dataset demo
  python -m scvnet_jax.eval --dataset demo --weights random
  python -m scvnet_jax.eval --dataset roxford5k --data_dir DATA --weights CVPR2022_CVNet_R50.pyth
  python -m scvnet_jax.eval --config configs/eval_minirevisit.py --weights r50.pyth --topk 10
  python -m scvnet_jax.eval --dataset demo --pipelines superglobal_global,icfrr,alpha_qe,dba
  python -m scvnet_jax.eval --dataset folder:tfds/my_photos --weights runs/mine/model
  python -m scvnet_jax.eval --dataset gldv2_retrieval --data_dir DATA --weights CVPR2022_CVNet_R50.pyth
  python -m scvnet_jax.eval --dataset rparis6k --data_dir DATA --weights converted/cvnet_r101 \\
      --pipelines superglobal_global,superglobal_rerank --distractors DATA/revisitop1m/revisitop1m.txt
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

from scvnet_jax import cli

# flag -> config field it sets (when given); the rerankers' flags come from the registry
FIELDS = {"dataset": "dataset", "data_dir": "data_dir", "weights": "weights",
          "distractors": "distractors", "distractors_dir": "distractors_dir",
          "output": "output", "cache_dir": "cache_dir", "save_visuals": "save_visuals",
          "dtype": "dtype", "batch_size": "batch_size", "bucket": "bucket",
          "feature_bucket": "feature_bucket", "workers": "workers",
          "first_stage": "rerank.first_stage"}


def reranker_flags() -> dict:
    """flag -> (reranker, its Option), for the options of the registry that have a flag."""
    from scvnet_jax.rerank import registry
    return {o.flag: (r, o) for r in registry.RERANKERS.values() for o in r.options if o.flag}


def protocol_fields() -> tuple:
    """The config fields --protocol sets: every reranker's protocol option."""
    from scvnet_jax.rerank import registry
    return tuple(f"{r.section}.protocol" for r in registry.RERANKERS.values()
                 if any(o.name == "protocol" for o in r.options))


def rerankers_help() -> str:
    """The rerankers of the registry, their pipelines and options, for --help."""
    from scvnet_jax.rerank import registry
    lines = ["rerankers (pipeline: what; --config.<section>.<option>=value, default):"]
    for r in registry.RERANKERS.values():
        on = f"on {r.first_stage}" if r.first_stage else "on --first_stage"
        lines.append(f"  {r.pipeline}: {r.summary} ({on})")
        for o in r.options:
            flag = f", --{o.flag}" if o.flag else ""
            lines.append(f"      {r.section}.{o.name}{flag} = {o.eval_default!r}: "
                         f"{o.help + '; ' if o.help else ''}{o.describe()}")
    return "\n".join(lines)


def _define(fv, argv):
    from absl import flags

    from scvnet_jax.evaluation.config import (FIRST_STAGES, official_pipelines,
                                              rerank_pipelines)

    demo = any(a in ("--dataset=demo", "-dataset=demo") or
               (a in ("--dataset", "-dataset") and argv[i + 1:i + 2] == ["demo"])
               for i, a in enumerate(argv))
    default = cli.packaged_config("eval_demo.py" if demo else "eval_revisitop.py")
    cli.define_config(fv, argv, default, "evaluation config file with get_config() (default: "
                      "configs/eval_revisitop.py; with --dataset demo, configs/eval_demo.py)")
    s, i, e = flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_enum
    s("dataset", None, "benchmark: roxford5k (default), rparis6k, demo (generated from "
      "photographs shipped with scikit-image; the bundled demo model), gldv2_retrieval (GLDv2's "
      "retrieval benchmark, mAP@100; python -m scvnet_jax.data.build gldv2_retrieval first) or "
      "folder:<data_dir>/<name> (the held-out split of your own photos, built by python -m "
      "scvnet_jax.data.build folder)", flag_values=fv)
    s("data_dir", None, "folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/ (demo: "
      "default <cache_dir>/demo_benchmark, built on first use)", flag_values=fv)
    s("weights", None, "official CVNet checkpoint (.pyth/.pth), a model directory (written by "
      "`python -m scvnet_jax.convert` or train.py), a training run's checkpoint step "
      "(W/checkpoints/<step>, stages 1 and 2), or 'random': an untrained model of the "
      "default model's shape (demo: the bundled demo model's; else the official R50's), seed "
      "0. Default for demo: the bundled demo model", flag_values=fv)
    official = official_pipelines()
    s("pipelines", None, "comma list of " + ", ".join(official + rerank_pipelines()) +
      f" (default: the first {len(official)}, the official test scripts' pipelines; the "
      "others rerank --first_stage's ranking)", flag_values=fv)
    e("first_stage", None, list(FIRST_STAGES), "the ranking that " +
      ", ".join(rerank_pipelines()) + " rerank (default: superglobal_global)", flag_values=fv)
    for flag, (r, o) in reranker_flags().items():
        define = {int: i, float: flags.DEFINE_float, bool: flags.DEFINE_bool}.get(o.kind, s)
        define(flag, None, f"{o.help or o.name} for the {r.pipeline} pipeline (config."
               f"{r.section}.{o.name}; default: {o.eval_default!r})", flag_values=fv)
    protocols = protocol_fields()
    e("protocol", None, ["official", "blind"], "rerank protocol of " +
      ", ".join(f.split(".")[0] for f in protocols) + " (default: official; see above)",
      flag_values=fv)
    s("distractors", None, "revisitop 1M distractor list (revisitop1m.txt) to add to the "
      "database (+R1M)", flag_values=fv)
    s("distractors_dir", None, "folder the distractor paths are relative to (default: the "
      "list's folder)", flag_values=fv)
    s("output", None, "results JSON (default: results/{dataset}/results.json, {dataset} "
      "being the dataset's name; results/ is ignored by git); ranks go to <stem>_ranks.npz",
      flag_values=fv)
    s("cache_dir", None, "descriptor cache (default: ~/.cache/scvnet_jax); '' disables it",
      flag_values=fv)
    s("save_visuals", None, "write one PNG per query into this folder: the query crop and its "
      "top-10 per pipeline, bordered by label", flag_values=fv)
    e("dtype", None, ["float32", "bfloat16"], "backbone compute dtype (default float32: "
      "parity with the official code)", flag_values=fv)
    i("batch_size", None, "images (or rerank pairs) per device per batch (default 0: auto, 1 "
      "on CPU, 8 on GPU/TPU)", flag_values=fv)
    s("bucket", None, "pad image sizes up to multiples of this many pixels so that one "
      "compilation serves many sizes, or 'auto': a few padded shapes chosen from the images' "
      "sizes; results are unchanged (default: auto; 1 = exact sizes)", flag_values=fv)
    s("feature_bucket", None, "likewise for local-feature sizes when scoring CVNet rerank "
      "pairs, in feature cells, or 'auto' (default: auto)", flag_values=fv)
    i("workers", None, "image-decoding threads (default: 4)", flag_values=fv)
    cli.define_distributed(fv, "see above")


def build_config(fv):
    """The config file (with its --config.* overrides), then the flags given."""
    cfg = fv.config
    with cfg.unlocked():
        for flag, field in FIELDS.items():
            value = fv[flag].value
            if flag in ("bucket", "feature_bucket") and isinstance(value, str) \
                    and value.strip().lstrip("-").isdigit():
                value = int(value)        # an integer or "auto" (checked by validate)
            if value is not None:
                node, *path = cfg, *field.split(".")
                for p in path[:-1]:
                    node = node[p]
                node[path[-1]] = value
        sets = {flag: (f"{r.section}.{o.name}",) for flag, (r, o) in reranker_flags().items()}
        sets["protocol"] = protocol_fields()
        for flag, fields in sets.items():
            value = fv[flag].value
            if value is not None:
                for field in fields:
                    node, *path = cfg, *field.split(".")
                    for p in path[:-1]:
                        node = node[p]
                    node[path[-1]] = value
        if fv.pipelines is not None:
            cfg.pipelines = [p.strip() for p in fv.pipelines.split(",") if p.strip()]
    return cfg


def load_model(weights: str, dataset: str, dtype):
    """The model to evaluate; 'random' = untrained, shaped like the dataset's default model."""
    from scvnet_jax import api as sj

    if weights != "random":
        return sj.load(weights, dtype=dtype)
    arch = {}                    # sj.create's defaults: the official R50
    if dataset == "demo":
        from scvnet_jax.convert import read_config
        arch = read_config(sj.demo_model_path())["arch"].asdict()
    return sj.create(**arch, seed=0, dtype=dtype)


def run(cfg, *, protocol_flag: str | None = None) -> int:
    """Evaluates `cfg`; `protocol_flag`: the --protocol given, if any (a note says when it
    cannot be followed). The images' working size and pixel limit it sets for the dataset
    are put back when it returns: a caller in the same process (a training run's
    validation, a test) reads images as before."""
    from scvnet_jax import images
    side, pixels = images.max_side(), images.max_pixels()
    try:
        return _run(cfg, protocol_flag=protocol_flag)
    finally:
        images.set_max_side(side)
        images.set_max_pixels(pixels)


def _run(cfg, *, protocol_flag: str | None = None) -> int:
    from scvnet_jax.evaluation.config import default_cache_dir, output_path, validate

    validate(cfg)                             # before any work (and before JAX loads)
    import jax
    import jax.numpy as jnp

    from scvnet_jax import api as sj
    from scvnet_jax.data.revisitop import read_distractor_list
    from scvnet_jax.errors import CheckpointError, InputError
    from scvnet_jax.evaluation import pipelines, report, visuals
    from scvnet_jax.evaluation.config import reranker_of, reranker_options
    from scvnet_jax.images import DEFAULT_MAX_SIDE, set_max_pixels, set_max_side

    set_max_pixels(cfg.max_image_pixels)
    official = cfg.dataset in ("roxford5k", "rparis6k", "gldv2_retrieval")
    set_max_side(cfg.max_side if cfg.max_side >= 0 else 0 if official else DEFAULT_MAX_SIDE)
    if cfg.dataset == "demo":
        from scvnet_jax.data import demo
        if not cfg.data_dir:
            cfg.data_dir = os.path.join(cfg.cache_dir or default_cache_dir(), "demo_benchmark")
        demo.build_benchmark(cfg.data_dir)    # a few seconds, once
        if not cfg.weights:
            cfg.weights = str(sj.demo_model_path())
    if not cfg.data_dir and not cfg.dataset.startswith("folder:"):
        raise InputError("--data_dir is required (the folder holding "
                         + ("gldv2_retrieval/, written by python -m scvnet_jax.data.build "
                            "gldv2_retrieval)" if cfg.dataset == "gldv2_retrieval" else
                            f"{cfg.dataset}/gnd_{cfg.dataset}.pkl)"))
    if not cfg.weights:
        raise CheckpointError("--weights is required (an official .pyth/.pth or a converted "
                              "model directory, or 'random')")
    t0 = time.time()
    cli.use_compilation_cache(cfg.cache_dir)
    lead = jax.process_index() == 0
    dataset = pipelines.open_dataset(cfg.dataset, cfg.data_dir,
                                     cfg.cache_dir or default_cache_dir())
    distractors = (read_distractor_list(cfg.distractors, cfg.distractors_dir or None)
                   if cfg.distractors else None)
    model = load_model(cfg.weights, cfg.dataset, jnp.dtype(cfg.dtype))
    n_db = dataset.n_db + len(distractors or [])
    if lead:
        print(f"{dataset.name}: {dataset.n_queries} queries, {n_db} database images"
              f"{f' ({len(distractors)} distractors)' if distractors else ''}; "
              f"weights {cfg.weights} (R{model.depth}, {cfg.dtype}); "
              f"pipelines {', '.join(cfg.pipelines)}{_rerank_summary(cfg, dataset)}",
              flush=True)
        for note in dataset.notes:
            print(note, flush=True)
    notes = _pipeline_notes(cfg, dataset, n_db, protocol_flag)
    if lead:
        for note in notes.values():
            print(f"note: {note}", flush=True)
    results = pipelines.evaluate(cfg, model, dataset, distractors)
    if not lead:
        return 0
    meta = {"dataset": dataset.name + ("+R1M" if distractors else ""),
            "n_queries": dataset.n_queries, "n_db": n_db, "weights": str(cfg.weights),
            "dtype": cfg.dtype, **({"notes": list(dataset.notes)} if dataset.notes else {})}
    metric = "mAP@100" if dataset.protocol == "gldv2" else "mAP"
    if dataset.protocol != "revisitop":
        meta["metric"] = metric
    print()
    print(report.table(results, cfg.ks, f"{meta['dataset']} results (percent):", metric))
    extra = {}
    own = {f.name for f in dataclasses.fields(pipelines.PipelineResult)}
    for name in cfg.pipelines:        # each reranker's options (the official test scripts'
        r = reranker_of(name)         # at the top level too, as they always were, but for
        if r is not None:             # what the result itself says, e.g. the protocol run)
            opts = reranker_options(cfg, r)
            extra[name] = {"options": opts, **({k: v for k, v in opts.items() if k not in own}
                                               if r.first_stage else {})}
    for name, note in notes.items():
        extra[name]["notes"] = meta.get("notes", []) + [note]
    out, ranks = report.write(results, cfg.ks, meta, output_path(cfg), extra)
    print(f"wrote {out} and {ranks} in {time.time() - t0:.0f} s")
    if cfg.save_visuals:
        paths = visuals.save_all(cfg.save_visuals, results, dataset.query_images(),
                                 dataset.db_images() + list(distractors or []), dataset.gnd,
                                 dataset.qimlist, cfg.visuals_topn)
        print(f"wrote {len(paths)} result grids to {cfg.save_visuals}")
    return 0


def _rerank_summary(cfg, dataset) -> str:
    """'; cvnet_rerank top-100, protocol official' for the chosen rerankers with a depth
    or a protocol."""
    from scvnet_jax.evaluation import pipelines
    from scvnet_jax.evaluation.config import reranker_of, reranker_options

    out = []
    for name in cfg.pipelines:
        r = reranker_of(name)
        opts = reranker_options(cfg, r) if r is not None else {}
        said = ([f"top-{opts[r.depth]}"] if r is not None and r.depth and
                opts[r.depth] is not None and r.depth_from_rerank_k else [])
        if "protocol" in opts:
            said.append(f"protocol {pipelines.label_protocol(dataset, opts['protocol'])}")
        if said:
            out.append(f"{name} {', '.join(said)}")
    return "".join(f"; {o}" for o in out)


def _pipeline_notes(cfg, dataset, n_db: int, protocol_flag=None) -> dict[str, str]:
    """{pipeline: note} where a setting asked for is not what runs: --protocol official on
    a benchmark without revisitop's labels (it runs blind; the default "official" turns
    blind there without a note, as the header line says), ICFRR's KG / KQ above the
    database size (clipped)."""
    from scvnet_jax.evaluation import pipelines
    from scvnet_jax.evaluation.config import reranker_of, reranker_options

    notes = {}
    for name in cfg.pipelines:
        r = reranker_of(name)
        if r is None:
            continue
        opts = reranker_options(cfg, r)
        if "protocol" in opts:
            asked = opts["protocol"]
            used = pipelines.label_protocol(dataset, asked)
            if used != asked and protocol_flag == asked:
                notes[name] = (f"{name}: protocol {asked} needs revisitop's Easy/Hard/junk "
                               f"labels, which {dataset.name} has not; it runs {used} (the "
                               "plain top-k)")
        note = r.note(opts, n_db) if r.note else ""
        if note:
            notes[name] = note
    return notes


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = cli.parse(argv, _define, "python -m scvnet_jax.eval",
                   __doc__.rstrip() + "\n\n" + rerankers_help())
    if isinstance(fv, int):
        return fv

    def go():
        cli.init_distributed(fv)
        try:
            return run(build_config(fv), protocol_flag=fv.protocol)
        except KeyboardInterrupt:
            print("interrupted; finished chunks are cached, run the same command to resume",
                  file=sys.stderr)
            return 130

    return cli.run(go)


if __name__ == "__main__":
    sys.exit(main())
