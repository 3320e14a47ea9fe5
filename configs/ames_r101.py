"""Stage 4 at paper scale: AMES on the official CVNet-R101's local descriptors (with the
released detector) of GLDv2-clean, the official architecture; variant `dist`: the
binarized model distilled from a full-precision one.

Commands (rerun the same command to resume):

    python train.py --config configs/ames_r101.py --workdir runs/ames_r101 \
        --config.data.data_dir=/data/tfds --config.ames.model=CVPR2022_CVNet_R101.pyth \
        --config.ames.detector=cvnet_detector.pt
    python train.py --config configs/ames_r101.py:dist --workdir runs/ames_r101_dist \
        --config.data.data_dir=/data/tfds --config.ames.model=CVPR2022_CVNet_R101.pyth \
        --config.ames.detector=cvnet_detector.pt --config.ames.teacher=runs/ames_r101/model
    python eval.py --dataset roxford5k --data_dir DATA --weights CVPR2022_CVNet_R101.pyth \
        --pipelines superglobal_global,ames --ames_weights runs/ames_r101/model

Hardware: any JAX backend; the global batch is split over all devices and hosts. The bank
is one local-descriptor extraction of every training image (3 scales of the R101, the
detector's top 700; 1.6M x 700 x 1024 float16 = 2.3 TB, written chunk by chunk under
W/ames_bank/ on storage every host reads) plus one SuperGlobal extraction for the hard
negatives; pairs read only their rows.
Expected time: not measured (the machine this was written on has no accelerator).
Expected result: the target is the paper's CVNet-based AMES on ROxford5k/RParis6k (Suma et
al., ECCV 2024); this recipe has not been run to the end, so that result is not
reproduced here.

What comes from the paper and the official code: the architecture (conf/model/ames.yaml:
model_dim 128, 2 heads, 5 post-norm decoder layers, feed-forward 1024, ReLU), the local
descriptors (the official extraction: R101 stage 3, 3 scales, the detector's top 700),
binary cross-entropy on image pairs with hard negatives by global descriptors, variable
numbers of descriptors on each side (the "universal" model; the released evaluation uses
600 per query and 50 per database image), the binarized model by distillation, the
authors' lamb / temp for CVNet (fp 0.85 / 0.8, dist 0.65 / 0.2). Our choices (no training
code was released): AdamW at 1e-4 with warmup and cosine decay, batch 256 pairs, 200k
steps, half positives, hard negatives with probability 0.5 from each image's top 20,
query lengths 100..600 and database lengths 10..100, the distillation loss (BCE to the
teacher's probability, weight 1).
"""
from scvnet_jax.configs import demo
from scvnet_jax.training.config import default_config

DIST = {"ames.binarized": True, "ames.lamb": 0.65, "ames.temp": 0.2}


def get_config(variant: str = ""):
    c = default_config()
    c.stage = "ames"
    c.data.name = "gldv2_clean"
    c.ames.model = "CVPR2022_CVNet_R101.pyth"
    c.ames.detector = "cvnet_detector.pt"
    c.ames.family = "superglobal"
    c.ames.topk = 700
    c.ames.query_len = (100, 600)
    c.ames.db_len = (10, 100)
    c.ames.model_dim = 128
    c.ames.nhead = 2
    c.ames.num_encoder_layers = 5
    c.ames.dim_feedforward = 1024
    c.ames.positive_fraction = 0.5
    c.ames.hard_ratio = (0.5, 0.5)
    c.ames.bank_k = 20
    c.ames.lamb = 0.85
    c.ames.temp = 0.8
    c.batch_size = 256
    c.total_steps = 200_000
    c.checkpoint_every_steps = 2000
    c.log_every_steps = 100
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 1e-4
    c.optimizer.warmup_steps = 2000
    c.optimizer.clip_norm = 1.0
    return demo.apply_variant(c, variant, {"dist": DIST})
