"""Stage 3 at paper scale: the CSA reranker on a ResNet-50 CVNet's SuperGlobal descriptors
of GLDv2-clean, the official CSA architecture and recipe.

Command (a trained or official CVNet as csa.model; rerun the same command to resume):

    python train.py --config configs/csa_r50.py --workdir runs/csa_r50 \
        --config.data.data_dir=/data/tfds --config.csa.model=CVPR2022_CVNet_R50.pyth
    python eval.py --dataset roxford5k --data_dir DATA --weights CVPR2022_CVNet_R50.pyth \
        --pipelines superglobal_global,csa --csa_weights runs/csa_r50/model

Hardware: any JAX backend; the global batch (256 samples) is split over all devices and
hosts. The descriptor bank is one SuperGlobal extraction of the 1.58M training images
(3 scales, whole images; the longest part of the run on a small machine) and an exact
top-512 search over them; each sample's 512 x 512 affinity features are computed on the
host from it, as the official data loader does.
Expected time: not measured (the machine this was written on has no accelerator).
Expected result: the target is the paper's CSA on ROxford5k/RParis6k (Ouyang et al.,
NeurIPS 2021, Table 2: +~7 Medium mAP over a GeM first stage); this recipe has not been run
to the end, so that result is not reproduced here.

What comes from the official code (github MCC-WH/CSA: experiment_rSfm120k.sh, train.py):
embed_dim 768, 12 heads, depth 2, MLP ratio 4, qkv bias, dropouts 0.1 (input, embedding,
attention, projections) and DropPath 0.1, 512 tokens x 512 anchors per sample, the loss
(contrastive at temperature 2 + 0.2 x feature alignment), SGD momentum 0.9 with lr
0.1 x batch / 256 after 20 warmup epochs of 100, weight decay 1e-6 (not on biases,
LayerNorm or feature_align), batch 256. Our choices: GLDv2-clean and SuperGlobal
descriptors of a CVNet instead of their GeM descriptors of SfM-120k/GLD-18 (the descriptor
the reranker sees at test time must be the one it trained on); 20 epochs (5 of warmup)
instead of 100, a first stage of 1.58M rather than ~120k images; warmup from 0 rather than
0.001 x batch / 256; gradient clipping at norm 10 (the official scripts never clip).
"""
from scvnet_jax.training.config import default_config

GLDV2_CLEAN_IMAGES = 1_580_470
EPOCHS = 20


def get_config():
    c = default_config()
    c.stage = "csa"
    c.data.name = "gldv2_clean"
    c.csa.model = "CVPR2022_CVNet_R50.pyth"
    c.csa.family = "superglobal"
    c.csa.topk = 512
    c.csa.anchor_len = 512
    c.batch_size = 256
    steps_per_epoch = GLDV2_CLEAN_IMAGES // c.batch_size
    c.total_steps = EPOCHS * steps_per_epoch
    c.checkpoint_every_steps = 2000
    c.log_every_steps = 100
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.1 * c.batch_size / 256
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-6
    c.optimizer.warmup_steps = 5 * steps_per_epoch
    c.optimizer.clip_norm = 10.0
    c.optimizer.decay_exclude = ("feature_align",)
    return c
