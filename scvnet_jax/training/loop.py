"""The training loop every stage shares: data-parallel `jax.jit` on a device mesh,
checkpoints, logging, the NaN stop. What differs between the stages (state, step, data,
export) is a *task* (`stage1.Task`, `stage2.Task`, `csa.Task`, `ames.Task`); the helpers
they share are here too (`all_finite`, `with_position`, `retrieval_model`, `host`, ...).

Sharding (flax examples/gemma style, no pmap): a 1-D mesh `('data',)` over every device of
every process; the global batch is split along 'data' (each process feeds its own part,
assembled with `jax.make_array_from_process_local_data`); the train state is replicated,
except the columns of a classifier (cvnet_global's, and its optimiser state), which are split over
'data' (`mesh.state_shardings`); the state is donated to the step. One compiled program
serves the whole run.

Restarting with the same command resumes from the newest checkpoint (`checkpoints.py`);
preemption saves one and stops. A NaN/Inf loss (or parameters) stops the run before it is
checkpointed, so the newest checkpoint is always a good one.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scvnet_jax import mesh as mesh_lib
from scvnet_jax.data.augment import Augment
from scvnet_jax.data import sources
from scvnet_jax.errors import ConfigError, NonFiniteLossError
from scvnet_jax.models.arch import Arch
from scvnet_jax.training import checkpoints, config, validation
from scvnet_jax.training.logging import MetricsWriter, read_metrics


class Task:
    """What a stage supplies to the loop (stage1.Task, stage2.Task, csa.Task, ames.Task)."""
    name: str                  # for messages
    rate: str                  # the throughput metric's name, e.g. "images_per_sec"
    bar_keys: tuple            # (metric, progress-bar label) pairs

    def __init__(self, cfg, ts: sources.TrainingSet, mesh, workdir: Path):
        self.cfg, self.ts, self.mesh, self.workdir = cfg, ts, mesh, workdir

    @staticmethod
    def check_config(cfg) -> None:
        """Raises ConfigError for settings that cannot work; runs before any data is read."""

    def compile(self, make_step: Callable, init: Callable, abstract, *,
                split_columns: tuple = ()) -> None:
        """Sets step_fn (state donated, batch split over 'data'), init and the shardings:
        the state replicated, except the 2-D leaves under the keys `split_columns` (cvnet_global:
        'classifier', in the parameters and the optimiser state), whose columns are split
        over 'data' (`mesh.state_shardings`)."""
        self.abstract = abstract
        self.state_sh = mesh_lib.state_shardings(abstract, self.mesh, split_columns)
        self.batch_sh = mesh_lib.batch_sharding(self.mesh)
        repl = mesh_lib.replicated(self.mesh)
        self.step_fn = jax.jit(make_step, in_shardings=(self.state_sh, self.batch_sh),
                               out_shardings=(self.state_sh, repl), donate_argnums=0)
        self.init = jax.jit(init, out_shardings=self.state_sh)

    def initial_state(self):
        raise NotImplementedError

    def iterator(self, step: int, state):
        """A fresh iterator over the stream that serves `step` (positioned at its start)."""
        raise NotImplementedError

    def needs_new_iterator(self, step: int) -> bool:
        """Whether the stream changes at `step` (cvnet_rerank: a refreshed hard-negative
        bank)."""
        return False

    def export(self, state, step: int) -> Path:
        raise NotImplementedError

    # helpers for the stages
    def augment(self) -> Augment:
        cfg = self.cfg
        return Augment.from_config({**cfg.data.augment, "size": cfg.data.image_size})

    def make_iterator(self, ds):
        d = self.cfg.data
        return sources.iterator(ds, threads=d.threads, prefetch=d.prefetch, workers=d.workers)


def read_init_from(cfg, fields=Arch.FIELDS):
    """(arch, variables) of cfg.init_from (official checkpoint or model directory), after
    checking that its architecture `fields` match cfg.model."""
    from scvnet_jax.convert import read_checkpoint

    arch, variables = read_checkpoint(cfg.init_from)
    want = {k: int(cfg.model[k]) for k in fields}
    got = {k: getattr(arch, k) for k in fields}
    if got != want:
        raise ConfigError(f"{cfg.init_from}: holds a model with {got}, but the config asks "
                          f"for {want} (set --config.model.* to match)")
    return arch, variables


def all_finite(tree) -> jax.Array:
    """Whether every leaf of `tree` is finite (one boolean; inside a train step)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def with_position(position: int, index: int) -> tuple[int, int]:
    """(position, index) for grain's map_with_index: at module level, as grain transforms
    must pickle."""
    return position, index


def retrieval_model(spec: str):
    """The retrieval model a reranker stage reads descriptors from (config.csa.model,
    config.ames.model): a model directory, an official checkpoint, or "demo"."""
    from scvnet_jax import api
    return api.load(api.demo_model_path() if spec == "demo" else spec)


def host(tree):
    """Host copy (NumPy) of a tree of arrays, also on a multi-process mesh. A replicated
    array is read from this process's first copy; a sharded one (a classifier's columns) is
    assembled from its shards, which on a multi-process mesh is a collective: every process
    must then call host() on it."""
    return jax.tree.map(_host, tree)


def _host(a):
    if not isinstance(a, jax.Array):
        return np.asarray(a)
    if a.is_fully_replicated:
        return np.asarray(a.addressable_data(0))
    if a.is_fully_addressable:
        return np.asarray(jax.device_get(a))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def train(task_cls, cfg, workdir, *, progress: bool = True) -> int:
    """Runs (or resumes) training in `workdir`; returns the exit status (0 = done).
    Raises ScvnetError for bad input, NonFiniteLossError for a diverged run."""
    config.validate(cfg)                 # before building or reading anything
    task_cls.check_config(cfg)
    config.check_workdir(workdir, cfg)
    workdir = Path(workdir).expanduser().resolve()
    lead = jax.process_index() == 0
    ts = sources.open_or_build(cfg.data.name, cfg.data.data_dir)
    workdir.mkdir(parents=True, exist_ok=True)   # only now: a refused run creates nothing
    # first thing in it: marks it ours; rewritten while no checkpoint holds the old one's
    # total_steps (config.check_workdir compares them)
    if lead and not ((workdir / "config.json").exists() and config.checkpoint_steps(workdir)):
        from scvnet_jax import files
        files.atomic_write_text(workdir / "config.json", cfg.to_json_best_effort(indent=2) + "\n")
    task = task_cls(cfg, ts, mesh_lib.make_mesh(), workdir)
    mngr = checkpoints.manager(workdir, cfg.keep_checkpoints)
    writer = MetricsWriter(workdir, enabled=lead)
    start = mngr.latest_step()
    if start is not None:
        state = checkpoints.restore_state(mngr, start, task.abstract, task.state_sh)
        print(f"resumed from {workdir / 'checkpoints' / str(start)} (step {start})")
    else:
        start = 0
        state = task.initial_state()
    writer.truncate_after(start)   # steps logged by a killed run after its last checkpoint
    if lead:
        print(f"{task.name}: {jax.device_count()} device(s) ({jax.devices()[0].platform}), "
              f"{jax.process_count()} process(es); global batch {cfg.batch_size}; "
              f"{ts.name}: {ts.num_examples} images, {ts.num_classes} classes")
    validator = validation.make(cfg, task, workdir, lead)   # after the data, before compiling
    if validator is not None and writer.path.is_file():
        validator.resume(read_metrics(workdir))

    preempt = checkpoints.Preemption(mngr)
    total = int(cfg.total_steps)
    try:
        if start < total:
            it = task.iterator(start, state)
            if start > 0:
                it = checkpoints.restore_iterator(mngr, start, it)
            batch = mesh_lib.global_batch(next(it), task.batch_sh)
            t0 = time.perf_counter()
            compiled = task.step_fn.lower(state, batch).compile()
            if lead:
                print(f"compiled the train step in {time.perf_counter() - t0:.1f} s")
            state, stopped = _loop(cfg, task, compiled, state, batch, it, mngr, writer, start,
                                   preempt, progress and lead, validator)
            if stopped:
                return preempt.stopped(int(host(state.step)), workdir)[1]
        elif total == 0:
            print("total_steps=0: exporting the initialisation (a random-init baseline)")
        else:
            print(f"already trained: step {start} >= total_steps {total}")
        if int(host(state.step)) >= total and lead:
            out = task.export(state, int(host(state.step)))
            print(f"model ({task.name}) written to {out}")
    finally:
        writer.close()
        preempt.close()
        checkpoints.finish(mngr)      # the background checkpoint writes; one error line
    return 0


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _loop(cfg, task, step_fn, state, batch, it, mngr, writer, start, preempt, progress,
          validator=None):
    """Steps from `start` to cfg.total_steps -> (last state, whether preemption stopped it)."""
    from tqdm import tqdm

    total = int(cfg.total_steps)
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=not progress,
               desc="train")
    window, prev = [], None
    t_last = time.perf_counter()
    step = start
    lead = jax.process_index() == 0
    try:
        while step < total:
            state, metrics = step_fn(state, batch)
            step += 1
            window.append(metrics)
            if prev is not None:
                _check_finite(prev, step - 1, mngr)   # the step before; this one still runs
            prev = metrics
            stop = preempt.reached(step)
            save = step % cfg.checkpoint_every_steps == 0 or step == total or stop
            # validation: a logged step of its own (the time it takes is not step_time)
            due = validator is not None and not stop and validator.due(step, total)
            if save or due:
                _check_finite(metrics, step, mngr)
            if step % cfg.log_every_steps == 0 or step == total or due:
                hosts = [{k: float(v) for k, v in host(m).items()} for m in window]
                now = time.perf_counter()
                dt = (now - t_last) / max(len(window), 1)
                rec = {k: float(np.mean([h[k] for h in hosts])) for k in hosts[0]
                       if k != "finite"}
                rate = task.rate
                rec.update({"step_time": dt, rate: cfg.batch_size / dt})
                writer.write(step, rec, validator.run(state, step) if due else None)
                bar.set_postfix_str(" ".join(f"{label} {_fmt(rec[k])}"
                                             for k, label in task.bar_keys)
                                    + f" {rec[rate]:.1f} {rate.split('_')[0]}/s "
                                    f"{dt * 1000:.0f} ms/step")
                if not progress and lead:
                    print(f"step {step}: " + json.dumps({k: round(v, 5) for k, v in
                                                          rec.items()}), flush=True)
                window, t_last = [], time.perf_counter()
            if save:     # after the step's record and validation: a checkpoint implies them
                checkpoints.save(mngr, step, state, it)
            bar.update(1)
            if stop:
                print("\n" + preempt.stopped(step, task.workdir)[0], file=sys.stderr)
                return state, True
            if step < total:
                if task.needs_new_iterator(step):   # cvnet_rerank: a refreshed descriptor bank
                    old = it.get_state()
                    it = task.iterator(step, state)
                    it.set_state(old)
                batch = mesh_lib.global_batch(next(it), task.batch_sh)
    finally:
        bar.close()
    return state, False


def _check_finite(metrics: dict, step: int, mngr) -> None:
    if bool(host(metrics["finite"])):
        return
    h = {k: float(v) for k, v in host(metrics).items()}
    good = mngr.latest_step()
    where = (f"the last good checkpoint is step {good} in {mngr.directory}" if good is not None
             else "no checkpoint was written yet")
    terms = ", ".join(f"{k}={h[k]}" for k in ("loss", "loss_cls", "loss_con", "grad_norm")
                      if k in h)
    raise NonFiniteLossError(
        f"non-finite training state at step {step} ({terms}); stopped "
        f"without saving it; {where}. Lower --config.optimizer.lr or set "
        "--config.optimizer.clip_norm, then rerun to resume from that checkpoint.")
