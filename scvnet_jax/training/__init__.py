"""Training of both CVNet stages (`train.py`, `python -m scvnet_jax.train`).

  config.py       default settings (configs/*.py start from them)
  loop.py         the loop: mesh, sharded jitted step, logging, the NaN stop, resume
  checkpoints.py  orbax checkpoints of the state and every process's data position (and a
                  checkpoint step read as a model: --weights W/checkpoints/<step>)
  validation.py   validation during training (config.eval): scores, W/model_best
  optim.py        optimiser and learning-rate schedule
  losses.py       CurricularFace and the momentum contrastive loss
  stage1.py       stage 1 (CVNet-Global): state, step, image-pair stream, task, export
  stage2.py       stage 2 (CVNet-Rerank): state, step, pairs, descriptor bank, task, export
  csa.py          stage 3 (CSA reranker): state, step, samples, descriptor bank, task, export
  ames.py         stage 4 (AMES reranker): state, step, pairs, local-descriptor bank, task,
                  export

    from scvnet_jax.training import train
    train(cfg, "runs/demo")      # cfg.stage picks the stage; returns 0 when done
"""
from __future__ import annotations

from scvnet_jax.errors import ConfigError

STAGES = (1, 2, 3, 4)


def task_class(cfg):
    """The `Task` of cfg.stage (1: CVNet-Global, 2: CVNet-Rerank, 3: CSA, 4: AMES)."""
    from scvnet_jax.training import ames, csa, stage1, stage2

    tasks = {1: stage1.Task, 2: stage2.Task, 3: csa.Task, 4: ames.Task}
    try:
        return tasks[int(cfg.stage)]
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"stage must be 1 (CVNet-Global), 2 (CVNet-Rerank), 3 (CSA) or 4 "
                          f"(AMES), got {cfg.stage!r}") from None


def train(cfg, workdir, *, progress: bool = True) -> int:
    """Runs (or resumes) the training `cfg` describes in `workdir`; returns 0 when done
    (also when preempted after saving). Raises ScvnetError subclasses for bad input and
    NonFiniteLossError (exit code 3) when the run diverges."""
    from scvnet_jax.training import loop

    return loop.train(task_class(cfg), cfg, workdir, progress=progress)


__all__ = ["train", "task_class", "STAGES"]
