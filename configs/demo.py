"""Stage 1 on the demo set, CPU-sized: a width-16 ResNet-50 (1/16 of the standard FLOPs)
trained from scratch on 96x96 crops of 72 instance classes (tiles of 11 scikit-image
photographs, 12 views each; no download, see scvnet_jax/data/demo.py), then scored on the
held-out demo benchmark (30 instances from 6 other photographs).

Command:

    python train.py --config configs/demo.py --workdir runs/demo

Hardware and time: 2 CPU cores (AMD EPYC, the CI machine type): ~0.35 s per step, 5.2
minutes in all (800 steps; the demo set is built on first use in ~3 s, the step compiles
in ~5-30 s). This run is the backbone of the bundled demo model.
Expected result (mAP % on the demo benchmark, cvnet_global pipeline;
tests/e2e/test_demo_train.py):

                      Easy  Medium  Hard
    initialisation    63.8    47.9   19.8    (--config.total_steps=0)
    after 800 steps   69.0    53.8   23.3

Loss (lambda_cls x CurricularFace + lambda_con x contrastive) falls from ~12.6 to ~7.7;
classification accuracy on the training batches reaches ~47%. The margin is real but
noisy: 1200 steps (this config until 2026-12-05) gave 67.7 / 53.6 / 24.6, 600 steps
65.7 / 47.9 / 14.6 (no Medium gain); with Flax's one-pass BatchNorm variance 1200 steps
reached 77.5 / 59.4 / 24.2.

Validation (`config.eval`): at steps 400 and 800 the cvnet_global pipeline scores the
current model on the demo benchmark (for `--config.data.name=<a folder set>`: its held-out
split); the mAPs go to metrics.jsonl and TensorBoard (`val/cvnet_global/mAP/M`), and
W/model_best is the best step's model. `--config.eval.every_steps=0` turns it off.

Variant `tiny` (`--config configs/demo.py:tiny`): a width-8 model on 64x64 crops, a few
seconds per run on a CPU; the tests and the notebooks' smoke mode use it for the mechanics
(sharding, resume, the NaN stop), not for results; no validation unless
--config.eval.every_steps is set.
"""
from scvnet_jax.errors import ConfigError
from scvnet_jax.training.config import default_config


TINY = {"model.width": 8, "model.reduction_dim": 32, "model.corr_dim": 16,
        "data.image_size": 64, "batch_size": 16, "loss.queue_size": 32,
        "optimizer.warmup_steps": 2, "log_every_steps": 2, "eval.every_steps": 0}


def get_config(variant: str = ""):
    c = default_config()
    c.total_steps = 800
    c.batch_size = 32
    c.checkpoint_every_steps = 200
    c.log_every_steps = 10
    c.data.name = "demo_landmarks"       # built on first use
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.image_size = 96
    c.data.threads = 4
    c.data.prefetch = 4
    c.data.augment.area = (0.3, 1.0)
    c.model.depth = 50
    c.model.width = 16
    c.model.reduction_dim = 256
    c.model.corr_dim = 64
    c.loss.queue_size = 1024
    c.loss.momentum = 0.99               # a short run: a faster-moving momentum encoder
    c.optimizer.name = "adamw"           # from scratch, small batch: AdamW is the robust choice
    c.optimizer.lr = 2e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.warmup_steps = 30
    c.eval.every_steps = 400             # validation at steps 400 and 800 (about 20 s each)
    c.eval.dataset = "auto"              # the demo benchmark; a folder set's held-out split
    return apply_variant(c, variant, {"tiny": TINY})


def apply_variant(c, variant: str, variants: dict):
    """The config as documented (variant '') or with the fields of `variants[variant]`."""
    if variant and variant not in variants:
        raise ConfigError(f"unknown variant {variant!r} of this config; known: "
                          f"{', '.join(variants)}")
    return set_fields(c, variants[variant]) if variant else c


def set_fields(c, fields: dict):
    """Sets {"a.b": value} fields of config `c`."""
    for key, value in fields.items():
        node, (*path, last) = c, key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c
