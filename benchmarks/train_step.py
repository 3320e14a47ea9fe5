"""Throughput of the train step, on synthetic batches (the data pipeline is not timed).

Stage 1 (images/s): encoder fwd+bwd, momentum encoder fwd, CurricularFace over all classes,
contrastive loss against the queue, optimizer, EMA. Stage 2 (pairs/s): frozen-backbone local
features of both images, Hide-and-Seek, cross-scale correlation, CVLearner fwd+bwd, optimizer.

    python benchmarks/train_step.py                                  # configs/cvnet_r50.py
    python benchmarks/train_step.py --batch_per_device 32 --dtype bfloat16 --json out.json
    python benchmarks/train_step.py --config configs/demo.py
    python benchmarks/train_step.py --config configs/cvnet_r50_rerank.py   # cvnet_rerank
    python benchmarks/train_step.py --config configs/demo_rerank.py

Uses every local device (data-parallel, as train.py does) and the config's model, image
size and (cvnet_global) number of classes (GLDv2-clean: 81,313). Prints the compiled step's
memory per device (XLA's memory analysis), then the rate in total and per device and the
step time, after one compiled warm-up step.

Memory at paper scale without an accelerator (R50, 512x512, global batch 128, 81,313
classes on 8 fake CPU devices; compiles only, from the state's shapes, so nothing is
allocated; cvnet_global compiles the step twice: classifier columns split over the devices, as
train.py runs it, and replicated, to show the difference):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python benchmarks/train_step.py --memory_only

CPU memory analysis is XLA's estimate for the CPU backend (its layouts and fusions); a TPU
compile of the same program differs somewhat, so treat a near-limit result as a warning.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cvnet_r50.py",
                   help="a config file, or the name of a shipped one (FILE:variant works)")
    p.add_argument("--batch_per_device", type=int, default=None,
                   help="default: the config's batch_size / device count")
    p.add_argument("--image_size", type=int, default=None, help="default: the config's")
    p.add_argument("--num_classes", type=int, default=81313,
                   help="classifier size (GLDv2-clean: 81313; the demo: 46)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--memory_only", action="store_true",
                   help="compile and print the memory per device; run no step")
    p.add_argument("--replicated_classifier", action="store_true",
                   help="cvnet_global: the classifier and its optimiser state replicated on every "
                   "device (unpadded), instead of its columns split over them (train.py)")
    args = p.parse_args(argv)

    import types

    from scvnet_jax import mesh as mesh_lib
    from scvnet_jax.cli import resolve_config
    from scvnet_jax.config_files import load_config
    from scvnet_jax.models import cvnet
    from scvnet_jax.training import stage1, stage2
    from scvnet_jax.training.config import arch_of, stage_of

    path, _, variant = resolve_config(["--config", args.config])[1].partition(":")
    cfg = load_config(path, *([variant] if variant else []))
    n = jax.device_count()
    cfg.batch_size = args.batch_per_device * n if args.batch_per_device else cfg.batch_size
    cfg.batch_size -= cfg.batch_size % n
    cfg.data.image_size = args.image_size or cfg.data.image_size
    if args.dtype:
        cfg.model.dtype = args.dtype
    mesh = mesh_lib.make_mesh()
    rng = np.random.default_rng(0)
    b, s = cfg.batch_size, cfg.data.image_size
    images = lambda: rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)  # noqa: E731
    stage = stage_of(cfg)
    split = not args.replicated_classifier
    classes = types.SimpleNamespace(num_classes=args.num_classes)
    if stage == "cvnet_rerank":
        task = stage2.Task(cfg, None, mesh, None)      # the loop's own compiled step
        init = lambda: task.init(jax.random.PRNGKey(0), cvnet.init(arch_of(cfg)))  # noqa: E731
        batch = lambda: mesh_lib.global_batch(dict(  # noqa: E731
            query=images(), candidate=images(), label=rng.integers(0, 2, b).astype(np.int32),
            hard=rng.random(b) < 0.5), task.batch_sh)
        what, unit = f"{b} pairs ({b // n}/device)", "pairs"
    else:
        cfg.loss.queue_size = max(cfg.batch_size, cfg.loss.queue_size // cfg.batch_size
                                  * cfg.batch_size)
        task = stage1.Task(cfg, classes, mesh, None, split_classifier=split)
        init = lambda: task.init(jax.random.PRNGKey(0), None)  # noqa: E731
        batch = lambda: mesh_lib.global_batch(dict(  # noqa: E731
            image=images(), positive=images(),
            label=rng.integers(0, args.num_classes, b).astype(np.int32)), task.batch_sh)
        what = (f"{b} images ({b // n}/device), {args.num_classes} classes "
                f"({task.columns} classifier columns, {_layout(split, n)}), queue "
                f"{cfg.loss.queue_size}")
        unit = "images"
    dev = jax.devices()[0]
    print(f"device: {n} x {dev.device_kind} ({jax.default_backend()}); host: "
          f"{platform.processor() or platform.machine()}, jax {jax.__version__}")
    print(f"stage {stage}: R{cfg.model.depth} width {cfg.model.width}, {s}x{s}, "
          f"{cfg.model.dtype}, global batch {what}")
    if args.memory_only:
        res = dict(device=dev.device_kind, devices=n, stage=stage, depth=cfg.model.depth,
                   width=cfg.model.width, image_size=s, dtype=cfg.model.dtype, global_batch=b)
        tasks = [(split, task)]
        if stage == "cvnet_global":    # the other layout, for comparison
            res["num_classes"] = args.num_classes
            tasks.append((not split, stage1.Task(cfg, classes, mesh, None,
                                                 split_classifier=not split)))
        for sp, t in tasks:
            label = _layout(sp, n) if stage == "cvnet_global" else "state replicated"
            state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                 t.abstract, t.state_sh)
            spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=t.batch_sh)
                    for k, v in jax.eval_shape(batch).items()}
            t0 = time.perf_counter()
            compiled = t.step_fn.lower(state, spec).compile()
            print(f"compile ({label}): {time.perf_counter() - t0:.1f} s")
            res["memory_" + ("split" if sp and stage == "cvnet_global" else "replicated")] = \
                _print_memory(compiled, label)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
        return
    state, batch = init(), batch()
    t0 = time.perf_counter()
    compiled = task.step_fn.lower(state, batch).compile()
    print(f"compile: {time.perf_counter() - t0:.1f} s")
    memory = _print_memory(compiled, _layout(split, n) if stage == "cvnet_global"
                           else "state replicated")
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    st = float(np.median(times))
    res = dict(device=dev.device_kind, devices=n, stage=stage, depth=cfg.model.depth,
               width=cfg.model.width, image_size=s, dtype=cfg.model.dtype, global_batch=b,
               step_time_s=st, **{f"{unit}_per_s": b / st, f"{unit}_per_s_per_device": b / st / n})
    res["memory"] = memory
    if stage == "cvnet_global":
        res["num_classes"] = args.num_classes
    print(f"step time {st * 1000:.0f} ms (median of {args.steps}); {b / st:.2f} {unit}/s, "
          f"{b / st / n:.2f} {unit}/s per device")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


TPU_CORE_BYTES = 16 * 2 ** 30    # a 16 GB TPU core (v3 core, v5e chip: 16 GiB HBM)


def _layout(split: bool, devices: int) -> str:
    if not split or devices == 1:
        return "classifier replicated" if devices > 1 else "one device"
    return "classifier columns split over the devices"


def _print_memory(compiled, label: str) -> dict | None:
    """Prints XLA's memory analysis of the compiled step (per device: every device runs the
    same partitioned program) and whether it fits a 16 GB TPU core; returns it in bytes."""
    m = compiled.memory_analysis()
    if m is None:
        print(f"memory per device ({label}): not reported by this backend")
        return None
    names = ("argument", "output", "alias", "temp", "generated_code")
    got = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in names}
    # donated state: the outputs that reuse argument buffers (alias) are counted once
    total = (got["argument"] + got["output"] - got["alias"] + got["temp"]
             + got["generated_code"])
    gib = lambda x: x / 2 ** 30  # noqa: E731
    fits = "fits" if total <= TPU_CORE_BYTES else "does NOT fit"
    print(f"memory per device ({label}): " + ", ".join(f"{k} {gib(v):.3f}" for k, v in
                                                       got.items())
          + f" GiB; total (argument + output - alias + temp + code) {gib(total):.3f} GiB: "
          f"{fits} a 16 GB TPU core ({gib(TPU_CORE_BYTES):.0f} GiB)")
    return {**{k + "_bytes": v for k, v in got.items()}, "total_bytes": total,
            "fits_16gib": total <= TPU_CORE_BYTES}


if __name__ == "__main__":
    main()
