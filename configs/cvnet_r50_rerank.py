"""Stage 2 at paper scale: the CVNet-Rerank head (conv2ds + CVLearner) of a ResNet-50 CVNet on
GLDv2-clean pairs, with the stage-1 backbone (configs/cvnet_r50.py) frozen.

Command (after stage 1; rerun the same command to resume):

    python train.py --config configs/cvnet_r50_rerank.py --workdir runs/cvnet_r50_rerank \
        --config.data.data_dir=/data/tfds --config.init_from=runs/cvnet_r50/model
    python eval.py --dataset roxford5k --data_dir DATA --weights runs/cvnet_r50_rerank/model

Hardware: any JAX backend; the global batch (64 pairs) is split over all devices and hosts.
Each refresh of the hard-negative bank is one inference pass over the 1.58M images (single
scale, 512x512) plus an exact top-20 search over them.
Expected time: steps x batch / (pairs/s); benchmarks/train_step.py measures pairs/s for
this config. It was not measured on an accelerator yet (the machine this was written on has
none); on a 2-core CPU see README "Benchmarks": not a CPU job.
Expected result: the target is the CVNet-Rerank R50 of the paper (Lee et al., CVPR 2022,
Table 3: ROxford5k/RParis6k Medium and Hard mAP after reranking the top 100); this recipe
has not yet been run to the end, so that result is not reproduced here.

What comes from the paper: the backbone frozen while the reranking network is trained;
binary cross-entropy on same-landmark / different-landmark pairs; hard negatives mined with
the global descriptor; a curriculum that makes the task harder over training; Hide-and-Seek
against occlusion. Our choices (the paper's training code is not public):
  - 50% positive pairs; the hard-negative ratio ramps 0 -> 50% and the Hide-and-Seek cell
    probability 0 -> 30% linearly over the whole run;
  - hard negatives: the top 20 images of other landmarks by the frozen single-scale global
    descriptor, the bank rebuilt once per epoch from new random crops;
  - AdamW lr 5e-4 (the head is trained from scratch), weight decay 1e-4 on kernels, one
    warmup epoch fraction (1000 steps), cosine decay, 4 epochs of anchors;
  - 512x512 random-resized crops of 50-100% of the image for both images of a pair (stage
    1 uses 25-100%): a verifier can only learn from pairs that share content. On the demo
    set, crops of 30-100% gave a head that made reranking worse, 80-100% one that helped.
"""
from scvnet_jax.configs import cvnet_r50 as stage1

EPOCHS = 4


def get_config(depth: int = 50):
    depth = int(depth)          # `--config configs/cvnet_r50_rerank.py:101` passes a string
    c = stage1.get_config(depth)
    c.stage = "cvnet_rerank"
    c.init_from = f"runs/cvnet_r{depth}/model"
    c.batch_size = 64                      # pairs
    steps_per_epoch = stage1.GLDV2_CLEAN_IMAGES // c.batch_size
    c.total_steps = EPOCHS * steps_per_epoch
    c.checkpoint_every_steps = 2000
    c.log_every_steps = 100
    c.data.augment.area = (0.5, 1.0)
    c.rerank.positive_fraction = 0.5
    c.rerank.hard_ratio = (0.0, 0.5)
    c.rerank.hide_prob = (0.0, 0.3)
    c.rerank.bank_k = 20
    c.rerank.bank_refresh_steps = steps_per_epoch
    c.rerank.bank_batch_size = 256
    c.optimizer.name = "adamw"
    c.optimizer.lr = 5e-4
    c.optimizer.weight_decay = 1e-4
    c.optimizer.warmup_steps = 1000
    return c
