"""Stage 1 at paper scale: CVNet-Global ResNet-50 on GLDv2-clean, 512x512 crops.

Command (build the dataset once, then train; rerun the same train command to resume):

    python -m scvnet_jax.data.build gldv2_clean --data_dir /data/tfds --manual_dir /data/gldv2
    python train.py --config configs/cvnet_r50.py --workdir runs/cvnet_r50 \
        --config.data.data_dir=/data/tfds
    python eval.py --dataset roxford5k --data_dir DATA --weights runs/cvnet_r50/model \
        --pipelines cvnet_global

Validation during training is off here (GLDv2-clean has no held-out split); to score the
model on ROxford5k every 5000 steps and keep the best in W/model_best, add
--config.eval.every_steps=5000 --config.eval.dataset=roxford5k --config.eval.data_dir=DATA.

Hardware: any JAX backend; the global batch (128) is split over all devices and hosts
(one GPU, an 8-GPU box, or a TPU pod slice with --distributed on every host).
Expected time: steps x batch / (images/s). benchmarks/train_step.py measures images/s per
device for this config; it was not measured on an accelerator yet (the machine this was
written on has none). On a 2-core CPU it runs at 0.16 images/s (batch 4): not a CPU job.
Expected result: the target is the CVNet-Global R50 of the paper (Lee et al., CVPR 2022,
Table 3, ROxford5k/RParis6k Medium and Hard mAP); this recipe has not yet been run to the
end, so that result is not reproduced here.

What comes from the paper: GLDv2-clean (Yokoo et al. 2020), ResNet-50 with GeM and a
2048-d FC head, 512x512 inputs, CurricularFace (Huang et al. 2020) plus a momentum
contrastive loss with a momentum encoder and a queue (He et al. 2020). The paper starts
from ImageNet weights; give any CVNet checkpoint to start from it instead:
--config.init_from=CVPR2022_CVNet_R50.pyth. The numbers below are our choices (the paper's
training code is not public), each with its source:
  - CurricularFace scale 30, margin 0.15: the ArcFace settings used on GLDv2 by DOLG
    (Yang et al. 2021); t's update rate 0.01 as in CurricularFace.
  - momentum 0.999, temperature 0.07: MoCo v1; queue 8192 (64 batches), not MoCo's 65536,
    which would hold ~4% of GLDv2-clean and mostly stale keys.
  - SGD momentum 0.9, lr 0.01 at batch 128, weight decay 1e-4 on kernels, cosine decay,
    one warmup epoch, 25 epochs (DOLG/DELG-style GLDv2 recipes, shortened).
  - crops: random-resized (area 25-100%), horizontal flip, colour jitter.
"""
from scvnet_jax.training.config import default_config

GLDV2_CLEAN_IMAGES = 1_580_470
EPOCHS = 25


def get_config(depth: int = 50):
    depth = int(depth)          # `--config configs/cvnet_r50.py:101` passes a string
    c = default_config()
    c.batch_size = 128
    steps_per_epoch = GLDV2_CLEAN_IMAGES // c.batch_size
    c.total_steps = EPOCHS * steps_per_epoch
    c.checkpoint_every_steps = 2000
    c.log_every_steps = 100
    c.data.name = "gldv2_clean"
    c.data.image_size = 512
    c.model.depth = depth
    c.loss.temperature = 0.07
    c.optimizer.warmup_steps = steps_per_epoch
    return c
