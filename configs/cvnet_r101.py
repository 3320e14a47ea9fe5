"""Stage 1 at paper scale: CVNet-Global ResNet-101 on GLDv2-clean, 512x512 crops.

Command:

    python train.py --config configs/cvnet_r101.py --workdir runs/cvnet_r101 \
        --config.data.data_dir=/data/tfds

Hardware: as configs/cvnet_r50.py; ResNet-101 costs about 1.9x the step time of R50.
Expected time: steps x batch / (images/s) from
`python benchmarks/train_step.py --config configs/cvnet_r101.py`; not yet measured on an
accelerator.
Expected result: the target is the paper's CVNet-Global R101 (Lee et al., CVPR 2022,
Table 3); not yet reproduced by this recipe.

Everything else (data, losses, optimizer and where each number comes from) is
configs/cvnet_r50.py with depth 101.
"""
from scvnet_jax.configs import cvnet_r50


def get_config():
    return cvnet_r50.get_config(depth=101)
