"""Checkpoints of a training run: `W/checkpoints/<step>/` (orbax CheckpointManager, async,
keep-N), each holding the whole train state (`state/`) and every process's data-iterator
position (`data/process_<i>-of-<n>.json`, grain's own checkpoint handler), so a restarted
run continues the same data stream on every host. All processes save the same steps; on a
multi-host run preemption goes through the manager's `reached_preemption` (JAX's
coordination service agrees on the step), on one process through SIGTERM or SIGINT (Ctrl-C).
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import jax
import numpy as np

from scvnet_jax.errors import ConfigError, OutputError, ScvnetError


def manager(workdir: Path, keep: int):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                        create=True)
    return ocp.CheckpointManager(Path(workdir) / "checkpoints", options=opts)


def _write_error(mngr, step, e: Exception) -> OutputError:
    """One line for a checkpoint that could not be written (a full disk, a read-only or
    vanished folder): which step, where, why, and which complete checkpoint remains. orbax
    writes into a temporary folder and renames it when complete, so a failed save leaves
    the earlier checkpoints as they were."""
    reason = " ".join(str(e).split())[:300] or type(e).__name__
    try:
        done = mngr.all_steps()
    except Exception:
        done = []
    done = [s for s in done if step is None or s < step]
    last = (f"the last complete checkpoint is step {max(done)}; rerun the same command "
            "to resume from it" if done else "no complete checkpoint was written")
    what = f"checkpoint {step}" if step is not None else "a checkpoint"
    return OutputError(f"cannot write {what} in {mngr.directory}: {reason} ({type(e).__name__}); "
                       f"{last} once there is room")


def save(mngr, step: int, state, iterator) -> None:
    """Saves `state` and this process's `iterator` position (every process calls it).
    orbax writes in the background: a failure of an earlier save surfaces here or in
    `finish` as one OutputError."""
    import grain
    import orbax.checkpoint as ocp

    try:
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)),
            force=True)
    except ScvnetError:
        raise
    except Exception as e:
        raise _write_error(mngr, step, e) from None


def finish(mngr) -> None:
    """Waits for the background writes (a failed one is one OutputError), then closes the
    manager (its own errors then repeat the one already raised, so they are dropped)."""
    try:
        mngr.wait_until_finished()
    except ScvnetError:
        raise
    except Exception as e:
        raise _write_error(mngr, None, e) from None
    finally:
        try:
            mngr.close()
        except Exception:
            pass


def restore_state(mngr, step: int, abstract_state, state_sh):
    """The train state of checkpoint `step`, placed with `state_sh`; refuses a checkpoint
    whose shapes differ from this config's (one ConfigError)."""
    import orbax.checkpoint as ocp

    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, state_sh)
    where = f"checkpoint {step} in {mngr.directory} does not fit this config"
    # cvnet_global's classifier has num_classes columns on one device and a multiple of 1024 on
    # several (mesh.padded_columns)
    mesh_hint = ("if it is the classifier, resume on one device a run written on one, on "
                 "several one written on several; ")
    try:
        state = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
    except ValueError as e:      # recent orbax refuses another shape itself
        if "stored shape" not in str(e):
            raise
        why = " ".join(str(e).split(".")[0].split())
        raise ConfigError(f"{where} ({why}); {mesh_hint}else use a new --workdir") from None
    bad = [jax.tree_util.keystr(p) for (p, a), b in zip(
        jax.tree_util.tree_flatten_with_path(target)[0], jax.tree.leaves(state))
        if a.shape != b.shape]
    if bad:                      # older orbax restored them silently
        hint = mesh_hint if any("classifier" in b for b in bad) else ""
        raise ConfigError(f"{where} (different shapes at {', '.join(bad[:3])}); {hint}"
                          f"{'else ' if hint else ''}use a new --workdir")
    return state


def restore_iterator(mngr, step: int, iterator):
    """Moves `iterator` (a fresh one of the same stream) to this process's saved position."""
    import grain
    import orbax.checkpoint as ocp

    return mngr.restore(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(iterator)))["data"]


class Preemption:
    """Whether to save and stop now. Multi-host: the checkpoint manager's
    `reached_preemption` (every host gets the same answer at the same step); one process:
    a SIGTERM or SIGINT (Ctrl-C) received since start. A second Ctrl-C stops at once
    (KeyboardInterrupt), without saving."""

    def __init__(self, mngr):
        self.mngr = mngr
        self.signalled = None          # the signal received, once one is
        self._old = {}
        if jax.process_count() == 1:
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) is not signal.SIG_IGN:   # (nohup, a background job)
                    self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signalled == signal.SIGINT:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again: stop without "
                  "saving)", file=sys.stderr, flush=True)
        self.signalled = signum

    def reached(self, step: int) -> bool:
        return bool(self.signalled) or self.mngr.reached_preemption(step)

    def stopped(self, step: int, workdir) -> tuple[str, int]:
        """(the line to print, the exit status) once the run saved `step` and stops."""
        if self.signalled == signal.SIGINT:
            return (f"interrupted at step {step}: checkpoint saved in {workdir}; run the same "
                    "command to resume", 130)
        return (f"preempted: saved a checkpoint at step {step}; run the same command to "
                "resume", 0)

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


# -- a checkpoint step as a model (eval.py / scvnet-search --weights W/checkpoints/<step>) ----

def is_run_checkpoint(path) -> bool:
    """`W/checkpoints/<step>` of a training run of ours (W holds its config.json)."""
    p = Path(path).expanduser()
    return (p.name.isdigit() and p.parent.name == "checkpoints" and (p / "state").is_dir()
            and (p.parent.parent / "config.json").is_file())


def read_state(step_dir) -> dict:
    """The raw train state saved in `step_dir` (W/checkpoints/<step>), every leaf a NumPy
    array, whatever devices and processes saved it."""
    import orbax.checkpoint as ocp

    path = Path(step_dir).expanduser().resolve() / "state"
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def read_model(step_dir):
    """(arch, CVNet variables) of a cvnet_global or cvnet_rerank run's checkpoint step, as
    its W/model would hold them at that step (the run's config.json says how; a run of an
    earlier version may number its stage). cvnet_global's rerank head comes from its
    init_from when that is still there, else it is random (seeded)."""
    import json
    import types

    import ml_collections

    from scvnet_jax.errors import CheckpointError
    from scvnet_jax.training import stage1, stage2
    from scvnet_jax.training.config import arch_of, saved_stage

    step_dir = Path(step_dir).expanduser().resolve()
    run = step_dir.parent.parent
    try:
        cfg = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
        stage = saved_stage(cfg.stage)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        raise CheckpointError(f"{run / 'config.json'}: cannot read the run's config "
                              f"({e})") from None
    if stage not in ("cvnet_global", "cvnet_rerank"):
        raise CheckpointError(f"{step_dir}: a checkpoint of a {stage!r} run (a reranker); only "
                              "CVNet runs (cvnet_global, cvnet_rerank) load as a retrieval "
                              "model")
    try:
        raw = read_state(step_dir)
    except Exception as e:    # orbax/tensorstore raise many kinds
        raise CheckpointError(f"{step_dir}: cannot restore the checkpoint "
                              f"({type(e).__name__}: {str(e)[:300]})") from None
    if stage == "cvnet_global":
        enc = stage1.export_variables(types.SimpleNamespace(**raw), cfg.export)
        variables, _ = stage1.cvnet_variables(cfg, enc)
    else:
        variables = stage2.variables(raw["backbone"], raw["params"])
    return arch_of(cfg), jax.tree.map(lambda x: np.asarray(x, np.float32), variables)
