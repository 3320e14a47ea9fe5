"""The training loop of both stages: data-parallel `jax.jit` on a device mesh, orbax
checkpoints, logging. What differs between the stages (state, step, data, export) is a
*task*: `Stage1Task` (CVNet-Global) or `Stage2Task` (CVNet-Rerank), chosen by cfg.stage.

Sharding (flax examples/gemma style, no pmap): a 1-D mesh `('data',)` over every device of
every process; the global batch is split along 'data' (each process feeds its own slice,
assembled with `jax.make_array_from_process_local_data`); the train state is replicated and
donated to the step. One compiled program serves the whole run.

Checkpoints (`W/checkpoints/<step>/`, orbax CheckpointManager, async, keep-N): the whole
train state (stage 1: parameters, BatchNorm statistics, momentum encoder, optimizer
state, queue, CurricularFace t, step; stage 2: head, optimizer state, frozen backbone, step)
and the grain iterator state, so a restarted run continues the
same data stream. Restarting with the same command resumes from the newest checkpoint;
SIGTERM (preemption) saves one and exits. A NaN/Inf loss (or parameters) stops the run
before it is checkpointed, so the newest checkpoint is always a good one.
"""
from __future__ import annotations

import io
import json
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scvnet_jax.data import training as data_lib
from scvnet_jax.data.revisitop import InputError
from scvnet_jax.training import stage1, stage2
from scvnet_jax.training.logging import MetricsWriter

EXIT_NONFINITE = 3
ARCH_FIELDS = ("depth", "width", "reduction_dim", "corr_dim")


class NonFiniteLoss(RuntimeError):
    pass


def make_mesh(devices=None) -> Mesh:
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), ("data",))


def shardings(mesh: Mesh, abstract_state):
    repl = NamedSharding(mesh, P())
    return jax.tree.map(lambda _: repl, abstract_state), NamedSharding(mesh, P("data")), repl


def compile_step(cfg, mesh: Mesh, num_classes: int):
    """(jitted step, state shardings, batch sharding, jitted init(rng, encoder_vars|None))."""
    abstract = jax.eval_shape(lambda k: stage1.init_state(cfg, num_classes, k),
                              jax.random.PRNGKey(0))
    state_sh, batch_sh, repl = shardings(mesh, abstract)
    step = jax.jit(stage1.make_train_step(cfg), in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, repl), donate_argnums=0)
    init = jax.jit(lambda k, enc: stage1.init_state(cfg, num_classes, k, enc),
                   out_shardings=state_sh)
    return step, state_sh, batch_sh, init, abstract


def compile_rerank_step(cfg, mesh: Mesh):
    """Stage 2: (jitted step, state shardings, batch sharding, jitted init(rng, CVNet
    variables), abstract state)."""
    from scvnet_jax.models import cvnet

    abstract = jax.eval_shape(lambda k, v: stage2.init_state(cfg, k, v),
                              jax.random.PRNGKey(0), cvnet.abstract_variables(cfg.model))
    state_sh, batch_sh, repl = shardings(mesh, abstract)
    step = jax.jit(stage2.make_train_step(cfg), in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, repl), donate_argnums=0)
    init = jax.jit(lambda k, v: stage2.init_state(cfg, k, v), out_shardings=state_sh)
    return step, state_sh, batch_sh, init, abstract


def global_batch(local: dict, batch_sh: NamedSharding) -> dict:
    return {k: jax.make_array_from_process_local_data(batch_sh, np.asarray(v))
            for k, v in local.items()}


def training_set(cfg):
    data_dir = str(Path(cfg.data.data_dir).expanduser())
    try:
        return data_lib.open_training_set(cfg.data.name, data_dir, cfg.data.split)
    except InputError:
        if cfg.data.name not in ("demo", "demo_landmarks"):
            raise
    from scvnet_jax.data import builders
    builders.prepare("demo", data_dir)  # the demo set is made here in a few seconds
    return data_lib.open_training_set("demo_landmarks", data_dir, cfg.data.split)


def read_init_from(cfg, fields=ARCH_FIELDS):
    """(arch, variables) of `cfg.init_from` (official checkpoint or model dir), after checking
    that its architecture `fields` match cfg.model."""
    from scvnet_jax import convert
    arch, variables = convert.read_checkpoint(cfg.init_from)
    want = {k: int(cfg.model[k]) for k in fields}
    got = {k: arch[k] for k in fields}
    if got != want:
        raise InputError(f"{cfg.init_from}: holds a model with {got}, but the config asks for "
                         f"{want} (set --config.model.* to match)")
    return arch, variables


def init_encoder_variables(cfg):
    """Encoder variables from `cfg.init_from` (official checkpoint or model dir), or None."""
    if not cfg.init_from:
        return None
    _, variables = read_init_from(cfg, ("depth", "width", "reduction_dim"))
    return {c: variables[c]["encoder_q"] for c in ("params", "batch_stats")}


def checkpoint_manager(workdir: Path, cfg):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints,
                                        enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(workdir / "checkpoints", options=opts)


def save(mngr, step: int, state, data_state: dict) -> None:
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=ocp.args.JsonSave(data_state)), force=True)


def restore(mngr, step: int, abstract_state, state_sh):
    import orbax.checkpoint as ocp

    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, state_sh)
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                     data=ocp.args.JsonRestore()))
    state = out["state"]
    bad = [jax.tree_util.keystr(p) for (p, a), b in zip(
        jax.tree_util.tree_flatten_with_path(target)[0], jax.tree.leaves(state))
        if a.shape != b.shape]
    if bad:  # orbax restores mis-shaped arrays silently
        raise InputError(f"checkpoint {step} in {mngr.directory} does not fit this config "
                         f"(different shapes at {', '.join(bad[:3])}); use a new --workdir")
    return state, out["data"]


def export_model(workdir: Path, cfg, state, step: int) -> Path:
    """W/model: a model directory eval.py and scvnet_jax.load read (stage-1 encoder; the
    rerank head comes from init_from if it had one, else it is randomly initialised)."""
    from scvnet_jax.convert import model_dir
    from scvnet_jax.models import cvnet

    arch = cvnet.arch_kwargs(cfg.model)
    base, head = None, "random (untrained)"
    if cfg.init_from:
        from scvnet_jax import convert
        a, v = convert.read_checkpoint(cfg.init_from)
        if a == arch:
            base, head = v, f"from {cfg.init_from}"
    if base is None:
        base = jax.tree.map(np.asarray, cvnet.init(arch, cfg.seed))
    enc = stage1.export_variables(state, cfg.export)
    variables = {c: {**base[c], "encoder_q": enc[c]} for c in ("params", "batch_stats")}
    meta = {"trained_by": "scvnet_jax train.py, stage 1 (CVNet-Global)", "step": int(step),
            "export": cfg.export, "data": cfg.data.name, "rerank_head": head}
    return model_dir.save_model_dir(workdir / "model", arch, variables, meta=meta,
                                    overwrite=True)


class _Preemption:
    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def _host(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _fmt(x: float) -> str:
    return f"{x:.4g}"


class Stage1Task:
    """Stage 1 (CVNet-Global): encoder + CurricularFace + momentum contrastive loss."""
    name = "stage 1 (CVNet-Global)"
    rate = "images_per_sec"
    bar_keys = (("loss", "loss"), ("loss_cls", "cls"), ("loss_con", "con"), ("lr", "lr"))
    check_config = staticmethod(stage1.check_config)

    def __init__(self, cfg, ts, mesh):
        self.cfg, self.ts = cfg, ts
        (self.step_fn, self.state_sh, self.batch_sh, self._init,
         self.abstract) = compile_step(cfg, mesh, ts.num_classes)

    def initial_state(self):
        return self._init(jax.random.PRNGKey(self.cfg.seed), init_encoder_variables(self.cfg))

    def needs_new_iterator(self, step: int) -> bool:
        return False

    def iterator(self, step: int, state, data_state=None):
        cfg = self.cfg
        ds = data_lib.dataset(self.ts, augment_of(cfg), global_batch=cfg.batch_size,
                              seed=cfg.seed, positive=cfg.data.positive,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
        return _iterator(cfg, ds, data_state)

    def export(self, workdir: Path, state, step: int) -> Path:
        return export_model(workdir, self.cfg, state, step)


class Stage2Task:
    """Stage 2 (CVNet-Rerank): frozen backbone, conv2ds + CVLearner trained on pairs; hard
    negatives from a bank of the backbone's global descriptors (W/hard_negatives/)."""
    name = "stage 2 (CVNet-Rerank)"
    rate = "pairs_per_sec"
    check_config = staticmethod(stage2.check_config)
    bar_keys = (("loss", "loss"), ("accuracy", "acc"), ("hard_negative_accuracy", "hard acc"),
                ("hide_prob", "hide"), ("lr", "lr"))

    def __init__(self, cfg, ts, mesh):
        self.cfg, self.ts = cfg, ts
        self.workdir: Path | None = None
        self.version = None
        (self.step_fn, self.state_sh, self.batch_sh, self._init,
         self.abstract) = compile_rerank_step(cfg, mesh)
        repl = NamedSharding(mesh, P())
        self._describe = jax.jit(stage2.make_descriptor_fn(cfg),
                                 in_shardings=(self.state_sh.backbone, self.batch_sh),
                                 out_shardings=repl)

    def initial_state(self):
        _, variables = read_init_from(self.cfg)
        return self._init(jax.random.PRNGKey(self.cfg.seed), variables)

    def needs_new_iterator(self, step: int) -> bool:
        return stage2.bank_version(self.cfg, step) != self.version

    def iterator(self, step: int, state, data_state=None):
        cfg = self.cfg
        version = stage2.bank_version(cfg, step)
        table = self.hard_negatives(version, state)
        r = cfg.rerank
        sampling = data_lib.PairSampling(
            positive_fraction=float(r.positive_fraction), hard_ratio=tuple(r.hard_ratio),
            curriculum_steps=stage2.curriculum_steps(cfg))
        ds = data_lib.rerank_dataset(self.ts, augment_of(cfg), sampling, table,
                                     global_batch=cfg.batch_size, seed=cfg.seed,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
        self.version = version
        return _iterator(cfg, ds, data_state)

    def hard_negatives(self, version: int, state) -> Path:
        """W/hard_negatives/v<version>.npy: (N, bank_k) int32, built once per version (on
        every process, identically) and reused on resume."""
        cfg = self.cfg
        path = self.workdir / "hard_negatives" / f"v{version}.npy"
        n, k = self.ts.num_examples, int(cfg.rerank.bank_k)
        if path.is_file():
            t = np.load(path, mmap_mode="r")
            if t.shape == (n, k) and t.dtype == np.int32:
                return path
        t0 = time.perf_counter()
        desc = self.descriptor_bank(version, state)
        table = stage2.hard_negative_table(desc, self.ts.labels(), k)
        if jax.process_index() == 0:
            from scvnet_jax.evaluation.cache import atomic_write_bytes
            buf = io.BytesIO()
            np.save(buf, table)
            atomic_write_bytes(path, buf.getvalue())
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"hard_negatives_v{version}")
        print(f"hard-negative bank v{version}: {n} descriptors, top-{k} other-landmark "
              f"neighbours, {time.perf_counter() - t0:.1f} s")
        return path

    def descriptor_bank(self, version: int, state) -> np.ndarray:
        from tqdm import tqdm

        cfg = self.cfg
        gb = int(cfg.rerank.bank_batch_size)
        gb -= gb % jax.device_count()
        gb = max(gb, jax.device_count())
        ds = data_lib.bank_dataset(self.ts, augment_of(cfg), version=version, global_batch=gb,
                                   seed=cfg.seed, process_index=jax.process_index(),
                                   process_count=jax.process_count())
        n = self.ts.num_examples
        out = np.zeros((n, cfg.model.reduction_dim), np.float32)
        it = data_lib.iterator(ds, threads=cfg.data.threads, prefetch=cfg.data.prefetch)
        with tqdm(total=n, unit="img", desc=f"bank v{version}", dynamic_ncols=True,
                  disable=jax.process_index() != 0) as bar:
            for i, local in enumerate(it):
                b = global_batch({"image": local["image"]}, self.batch_sh)
                d = np.asarray(self._describe(state.backbone, b["image"]))
                lo = i * gb
                take = min(gb, n - lo)
                out[lo:lo + take] = d[:take]
                bar.update(take)
        return out

    def export(self, workdir: Path, state, step: int) -> Path:
        from scvnet_jax.convert import model_dir

        v = jax.tree.map(np.asarray, jax.device_get(stage2.variables(state)))
        meta = {"trained_by": "scvnet_jax train.py, stage 2 (CVNet-Rerank)", "step": int(step),
                "backbone": f"frozen, from {self.cfg.init_from}", "data": self.cfg.data.name}
        return model_dir.save_model_dir(workdir / "model", self.cfg.model, v, meta=meta,
                                        overwrite=True)


TASKS = {1: Stage1Task, 2: Stage2Task}


def augment_of(cfg) -> data_lib.Augment:
    return data_lib.Augment.from_config({**cfg.data.augment, "size": cfg.data.image_size})


def _iterator(cfg, ds, data_state):
    it = data_lib.iterator(ds, threads=cfg.data.threads, prefetch=cfg.data.prefetch,
                           workers=cfg.data.workers)
    if data_state is not None:
        it.set_state(data_state)
    return it


def task_class(cfg):
    if int(cfg.stage) not in TASKS:
        raise ValueError(f"stage must be 1 (CVNet-Global) or 2 (CVNet-Rerank), got {cfg.stage}")
    return TASKS[int(cfg.stage)]


def train(cfg, workdir, *, progress: bool = True) -> int:
    """Runs (or resumes) training in `workdir`; returns the exit status (0 = done)."""
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    Task = task_class(cfg)
    Task.check_config(cfg)               # before building or reading any data
    ts = training_set(cfg)
    task = Task(cfg, ts, make_mesh())
    task.workdir = workdir
    mngr = checkpoint_manager(workdir, cfg)
    writer = MetricsWriter(workdir, enabled=lead)
    start = mngr.latest_step()
    data_state = None
    if start is not None:
        state, data_state = restore(mngr, start, task.abstract, task.state_sh)
        writer.truncate_after(start)
        print(f"resumed from {workdir / 'checkpoints' / str(start)} (step {start})")
    else:
        start = 0
        state = task.initial_state()
        if lead:
            (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2) + "\n")
    if lead:
        print(f"{task.name}: {jax.device_count()} device(s) ({jax.devices()[0].platform}), "
              f"{jax.process_count()} process(es); global batch {cfg.batch_size}; "
              f"{ts.name}: {ts.num_examples} images, {ts.num_classes} classes")

    preempt = _Preemption()
    total = int(cfg.total_steps)
    status = 0
    try:
        if start < total:
            it = task.iterator(start, state, data_state)
            batch = global_batch(next(it), task.batch_sh)
            t0 = time.perf_counter()
            compiled = task.step_fn.lower(state, batch).compile()
            if lead:
                print(f"compiled the train step in {time.perf_counter() - t0:.1f} s")
            status, state = _loop(cfg, task, compiled, state, batch, it, mngr, writer, start,
                                  preempt, lead, progress and lead)
        elif total == 0:
            print("total_steps=0: exporting the initialisation (a random-init baseline)")
        else:
            print(f"already trained: step {start} >= total_steps {total}")
        if status == 0 and int(state.step) >= total and lead:
            out = task.export(workdir, state, int(state.step))
            print(f"model ({task.name}) written to {out}")
    finally:
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
        preempt.restore()
    return status


def _loop(cfg, task, step_fn, state, batch, it, mngr, writer, start, preempt, lead,
          progress):
    """Steps from `start` to cfg.total_steps -> (exit status, last state)."""
    from tqdm import tqdm

    total = int(cfg.total_steps)
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=not progress,
               desc="train")
    window, prev = [], None
    t_last = time.perf_counter()
    step = start
    try:
        while step < total:
            state, metrics = step_fn(state, batch)
            step += 1
            window.append(metrics)
            if prev is not None:
                _check_finite(prev, step - 1, mngr)   # the step before; this one still runs
            prev = metrics
            is_ckpt = step % cfg.checkpoint_every_steps == 0 or step == total
            if is_ckpt or preempt.requested:
                _check_finite(metrics, step, mngr)
                save(mngr, step, state, it.get_state())
            if step % cfg.log_every_steps == 0 or step == total:
                host = [_host(m) for m in window]
                now = time.perf_counter()
                dt = (now - t_last) / max(len(window), 1)
                rec = {k: float(np.mean([h[k] for h in host])) for k in host[0]
                       if k != "finite"}
                rate = task.rate
                rec.update({"step_time": dt, rate: cfg.batch_size / dt})
                writer.write(step, rec)
                bar.set_postfix_str(" ".join(f"{label} {_fmt(rec[k])}"
                                             for k, label in task.bar_keys)
                                    + f" {rec[rate]:.1f} {rate.split('_')[0]}/s "
                                    f"{dt * 1000:.0f} ms/step")
                if not progress and lead:
                    print(f"step {step}: " + json.dumps({k: round(v, 5) for k, v in
                                                          rec.items()}), flush=True)
                window, t_last = [], time.perf_counter()
            bar.update(1)
            if preempt.requested:
                print(f"\nSIGTERM: saved a checkpoint at step {step}; run the same command to "
                      "resume", file=sys.stderr)
                return 0, state
            if step < total:
                if task.needs_new_iterator(step):   # stage 2: a refreshed descriptor bank
                    it = task.iterator(step, state, it.get_state())
                batch = global_batch(next(it), task.batch_sh)
    except NonFiniteLoss as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE, state
    finally:
        bar.close()
    return 0, state


def _check_finite(metrics: dict, step: int, mngr) -> None:
    if bool(metrics["finite"]):
        return
    h = _host(metrics)
    good = mngr.latest_step()
    where = (f"the last good checkpoint is step {good} in {mngr.directory}" if good is not None
             else "no checkpoint was written yet")
    terms = ", ".join(f"{k}={h[k]}" for k in ("loss", "loss_cls", "loss_con", "grad_norm")
                      if k in h)
    raise NonFiniteLoss(
        f"non-finite training state at step {step} ({terms}); stopped "
        f"without saving it; {where}. Lower --config.optimizer.lr or set "
        "--config.optimizer.clip_norm, then rerun to resume from that checkpoint.")

