r"""Train on GLDv2-clean, the demo set, or your own TFDS set; config.stage picks what:
"cvnet_global" (CVNet-Global: the backbone and global descriptor), "cvnet_rerank"
(CVNet-Rerank: the rerank head on the frozen cvnet_global backbone,
--config.init_from=<cvnet_global W/model>; hard negatives, Hide-and-Seek and their
curriculum), "csa" or "ames" (the CSA and AMES rerankers on a retrieval model's
descriptors, --config.csa.model / --config.ames.model).

    python -m scvnet_jax.train --config configs/demo.py --workdir runs/demo
    python -m scvnet_jax.train --config configs/demo_rerank.py --workdir runs/demo_rerank
    python -m scvnet_jax.train --config configs/cvnet_r50.py --workdir runs/cvnet_r50 \
        --config.data.data_dir=/data/tfds --config.init_from=CVPR2022_CVNet_R50.pyth
    python -m scvnet_jax.train --config configs/cvnet_r50.py --workdir W --config.optimizer.lr=0.005
    python -m scvnet_jax.train --config configs/cvnet_r50_rerank.py --workdir runs/cvnet_r50_rerank \
        --config.data.data_dir=/data/tfds --config.init_from=runs/cvnet_r50/model
    python -m scvnet_jax.train --config configs/demo.py:tiny --workdir /tmp/tiny   # seconds
    python -m scvnet_jax.train --config configs/csa_demo.py --workdir runs/csa_demo
    python -m scvnet_jax.train --config configs/ames_demo.py --workdir runs/ames_demo

(`python train.py ...` in a checkout is the same.) `--config` takes a config file, or the
name of one shipped with the package (`demo.py`, `cvnet_r50.py`, ...); `FILE:variant`
passes `variant` to its get_config(). Any config field can be overridden with
--config.<field>=<value>. The run writes W/checkpoints/ (orbax; resumable), W/metrics.jsonl
(one JSON object per logged step), W/tensorboard/ (TensorBoard summaries), W/config.json,
cvnet_rerank also W/hard_negatives/, and when done W/model/, a model directory that eval.py
and scvnet_jax.load read (as they read a checkpoint step, W/checkpoints/<step>). With
--config.eval.every_steps=N (on in configs/demo*.py) the current model is scored on a
held-out benchmark every N steps (config.eval.dataset: the demo benchmark, a folder set's
held-out split, ...; val/... in metrics.jsonl and TensorBoard) and W/model_best/ keeps the
best step's model. Rerun the same command to resume after a crash or preemption; Ctrl-C
(SIGINT) and SIGTERM save a checkpoint at the next step and stop.

Multi-host (TPU pod slice, multi-node GPU): run the same command on every host with
--distributed (the workdir must be a shared filesystem); give --coordinator_address,
--num_processes and --process_id where the cluster does not provide them.
Exit status: 0 done (or preempted by SIGTERM, saved), 2 bad input, 3 non-finite loss,
130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import sys

from scvnet_jax import cli


def _define(fv, argv):
    from absl import flags

    cli.define_config(fv, argv, None, "training config file with get_config() "
                      "(configs/*.py, or the name of one shipped with the package); "
                      "FILE:variant passes variant to get_config()")
    flags.DEFINE_string("workdir", None, "output folder (checkpoints, metrics, model)",
                        flag_values=fv)
    cli.define_distributed(fv, "the workdir must be on a shared filesystem")
    flags.DEFINE_bool("progress", True, "show a progress bar (else print a line per logged "
                      "step)", flag_values=fv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = cli.parse(argv, _define, "python -m scvnet_jax.train", __doc__)
    if isinstance(fv, int):
        return fv
    try:
        return cli.run(lambda: _train(fv))
    except KeyboardInterrupt:    # before the loop could save (Ctrl-C in the loop saves)
        print(f"interrupted before this progress could be saved (the checkpoints in "
              f"{fv.workdir}, if any, are kept); run the same command to resume",
              file=sys.stderr)
        return 130


def _train(fv) -> int:
    from absl import logging

    from scvnet_jax.errors import ConfigError

    if fv.config is None or not fv.workdir:
        raise ConfigError("--config and --workdir are required (see --help)")
    from scvnet_jax.training import config

    config.validate(fv.config)                 # before JAX loads or anything is made
    config.check_workdir(fv.workdir, fv.config)
    logging.set_verbosity(logging.WARNING)     # orbax logs every file at INFO
    cli.init_distributed(fv)
    from scvnet_jax.evaluation.config import default_cache_dir
    cli.use_compilation_cache(default_cache_dir())
    from scvnet_jax.training import train
    return train(fv.config, fv.workdir, progress=fv.progress)


if __name__ == "__main__":
    sys.exit(main())
