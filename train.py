r"""Train CVNet on GLDv2-clean, the demo set, or your own TFDS set, in two stages chosen by
the config: stage 1 (CVNet-Global: the backbone and global descriptor), then stage 2
(CVNet-Rerank: the rerank head on the frozen stage-1 backbone, --config.init_from=<stage-1
W/model>; hard negatives, Hide-and-Seek and their curriculum).

    python train.py --config configs/demo.py --workdir runs/demo
    python train.py --config configs/demo_rerank.py --workdir runs/demo_rerank
    python train.py --config configs/cvnet_r50.py --workdir runs/cvnet_r50 \
        --config.data.data_dir=/data/tfds --config.init_from=CVPR2022_CVNet_R50.pyth
    python train.py --config configs/cvnet_r50.py --workdir W --config.optimizer.lr=0.005
    python train.py --config configs/cvnet_r50_rerank.py --workdir runs/cvnet_r50_rerank \
        --config.data.data_dir=/data/tfds --config.init_from=runs/cvnet_r50/model

Any config field can be overridden with --config.<field>=<value>. The run writes
W/checkpoints/ (orbax; resumable), W/metrics.jsonl (one JSON object per logged step),
W/tensorboard/ (TensorBoard summaries), W/config.json, stage 2 also W/hard_negatives/, and
when done W/model/, a model directory that eval.py and scvnet_jax.load read. Rerun the same command to resume after a
crash or preemption. Multi-host (TPU pod slice, multi-node GPU): run the same command on
every host with --distributed (the workdir must be a shared filesystem). Exit status: 0 done, 2 bad input, 3 non-finite loss.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file with get_config() (configs/*.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, model).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (one process per host "
    "on TPU pod slices and multi-node GPU clusters).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (else print a line per "
                              "logged step).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
    import jax
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    from scvnet_jax.data.revisitop import InputError
    from scvnet_jax.convert import CheckpointError
    from scvnet_jax.training.trainer import train
    try:
        return train(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
    except (InputError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in sys.argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl's own exits 1
    app.run(main)
