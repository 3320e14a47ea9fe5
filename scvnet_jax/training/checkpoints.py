"""Checkpoints of a training run: `W/checkpoints/<step>/` (orbax CheckpointManager, async,
keep-N), each holding the whole train state (`state/`) and every process's data-iterator
position (`data/process_<i>-of-<n>.json`, grain's own checkpoint handler), so a restarted
run continues the same data stream on every host. All processes save the same steps; on a
multi-host run preemption goes through the manager's `reached_preemption` (JAX's
coordination service agrees on the step), on one process through SIGTERM.
"""
from __future__ import annotations

import signal
from pathlib import Path

import jax

from scvnet_jax.errors import ConfigError


def manager(workdir: Path, keep: int):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                        create=True)
    return ocp.CheckpointManager(Path(workdir) / "checkpoints", options=opts)


def save(mngr, step: int, state, iterator) -> None:
    """Saves `state` and this process's `iterator` position (every process calls it)."""
    import grain
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=grain.checkpoint.CheckpointSave(iterator)),
              force=True)


def restore_state(mngr, step: int, abstract_state, state_sh):
    """The train state of checkpoint `step`, placed with `state_sh`; refuses a checkpoint
    whose shapes differ from this config's (orbax would restore them silently)."""
    import orbax.checkpoint as ocp

    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, state_sh)
    state = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
    bad = [jax.tree_util.keystr(p) for (p, a), b in zip(
        jax.tree_util.tree_flatten_with_path(target)[0], jax.tree.leaves(state))
        if a.shape != b.shape]
    if bad:
        raise ConfigError(f"checkpoint {step} in {mngr.directory} does not fit this config "
                          f"(different shapes at {', '.join(bad[:3])}); use a new --workdir")
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
    a SIGTERM received since start."""

    def __init__(self, mngr):
        self.mngr = mngr
        self.signalled = False
        self._old = None
        if jax.process_count() == 1:
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.signalled = True

    def reached(self, step: int) -> bool:
        return self.signalled or self.mngr.reached_preemption(step)

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
