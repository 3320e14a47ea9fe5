"""Training (`train.py`, `python -m scvnet_jax.train`) of four stages, chosen by
`config.stage`: "cvnet_global" (CVNet-Global: the backbone and global descriptor),
"cvnet_rerank" (CVNet-Rerank: the rerank head on a frozen cvnet_global backbone), "csa" and
"ames" (the CSA and AMES rerankers).

  config.py       default settings (configs/*.py start from them), a section per stage
  loop.py         the loop: mesh, sharded jitted step, logging, the NaN stop, resume; and
                  the helpers the stages share
  checkpoints.py  orbax checkpoints of the state and every process's data position (and a
                  checkpoint step read as a model: --weights W/checkpoints/<step>)
  validation.py   validation during training (config.eval): scores, W/model_best
  optim.py        optimiser and learning-rate schedule
  losses.py       CurricularFace and the momentum contrastive loss
  stage1.py       cvnet_global: state, step, image-pair stream, task, export
  stage2.py       cvnet_rerank: state, step, pairs, descriptor bank, task, export
  csa.py          csa: state, step, samples, descriptor bank, task, export
  ames.py         ames: state, step, pairs, local-descriptor bank, task, export

    from scvnet_jax.training import train
    train(cfg, "runs/demo")      # cfg.stage picks the stage; returns 0 when done
"""
from __future__ import annotations

from scvnet_jax.training.config import STAGES, stage_of


def task_class(cfg):
    """The `Task` of cfg.stage (one of STAGES; ConfigError otherwise)."""
    from scvnet_jax.training import ames, csa, stage1, stage2

    tasks = {"cvnet_global": stage1.Task, "cvnet_rerank": stage2.Task, "csa": csa.Task,
             "ames": ames.Task}
    return tasks[stage_of(cfg)]


def train(cfg, workdir, *, progress: bool = True) -> int:
    """Runs (or resumes) the training `cfg` describes in `workdir`; returns 0 when done
    (also when preempted after saving). Raises ScvnetError subclasses for bad input and
    NonFiniteLossError (exit code 3) when the run diverges."""
    from scvnet_jax.training import loop

    return loop.train(task_class(cfg), cfg, workdir, progress=progress)


__all__ = ["train", "task_class", "STAGES"]
