"""Throughput of the train step, on synthetic batches (the data pipeline is not timed).

Stage 1 (images/s): encoder fwd+bwd, momentum encoder fwd, CurricularFace over all classes,
contrastive loss against the queue, optimizer, EMA. Stage 2 (pairs/s): frozen-backbone local
features of both images, Hide-and-Seek, cross-scale correlation, CVLearner fwd+bwd, optimizer.

    python benchmarks/train_step.py                                  # configs/cvnet_r50.py
    python benchmarks/train_step.py --batch_per_device 32 --dtype bfloat16 --json out.json
    python benchmarks/train_step.py --config configs/demo.py
    python benchmarks/train_step.py --config configs/cvnet_r50_rerank.py   # stage 2
    python benchmarks/train_step.py --config configs/demo_rerank.py

Uses every local device (data-parallel, as train.py does) and the config's model, image
size and (stage 1) number of classes (GLDv2-clean: 81,313). Prints the rate in total and
per device and the step time, after one compiled warm-up step.
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
    args = p.parse_args(argv)

    import types

    from scvnet_jax import mesh as mesh_lib
    from scvnet_jax.cli import resolve_config
    from scvnet_jax.config_files import load_config
    from scvnet_jax.models import cvnet
    from scvnet_jax.training import stage1, stage2
    from scvnet_jax.training.config import arch_of

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
    stage = int(cfg.stage)
    if stage == 2:
        task = stage2.Task(cfg, None, mesh, None)      # the loop's own compiled step
        state = task.init(jax.random.PRNGKey(0), cvnet.init(arch_of(cfg)))
        batch = mesh_lib.global_batch(dict(
            query=images(), candidate=images(), label=rng.integers(0, 2, b).astype(np.int32),
            hard=rng.random(b) < 0.5), task.batch_sh)
        what, unit = f"{b} pairs ({b // n}/device)", "pairs"
    else:
        cfg.loss.queue_size = max(cfg.batch_size, cfg.loss.queue_size // cfg.batch_size
                                  * cfg.batch_size)
        task = stage1.Task(cfg, types.SimpleNamespace(num_classes=args.num_classes), mesh, None)
        state = task.init(jax.random.PRNGKey(0), None)
        batch = mesh_lib.global_batch(dict(
            image=images(), positive=images(),
            label=rng.integers(0, args.num_classes, b).astype(np.int32)), task.batch_sh)
        what = (f"{b} images ({b // n}/device), {args.num_classes} classes, queue "
                f"{cfg.loss.queue_size}")
        unit = "images"
    dev = jax.devices()[0]
    print(f"device: {n} x {dev.device_kind} ({jax.default_backend()}); host: "
          f"{platform.processor() or platform.machine()}, jax {jax.__version__}")
    print(f"stage {stage}: R{cfg.model.depth} width {cfg.model.width}, {s}x{s}, "
          f"{cfg.model.dtype}, global batch {what}")
    t0 = time.perf_counter()
    compiled = task.step_fn.lower(state, batch).compile()
    print(f"compile: {time.perf_counter() - t0:.1f} s")
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
    if stage == 1:
        res["num_classes"] = args.num_classes
    print(f"step time {st * 1000:.0f} ms (median of {args.steps}); {b / st:.2f} {unit}/s, "
          f"{b / st / n:.2f} {unit}/s per device")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
