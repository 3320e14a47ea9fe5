"""Stage 2 on the demo set, CPU-sized: the CVNet-Rerank head (conv2ds + CVLearner) of the
demo model trained on pairs of demo training images, with the stage-1 demo backbone frozen.

Commands (stage 1 first; its W/model is this config's init_from):

    python train.py --config configs/demo.py --workdir runs/demo
    python train.py --config configs/demo_rerank.py --workdir runs/demo_rerank

Hardware and time: 2 CPU cores (AMD EPYC, the CI machine type): 12.2 minutes (1000 steps
at ~0.69 s, four builds of the 864-image hard-negative bank at ~5-7 s, compilation ~6 s).
This run is the bundled demo model (scvnet_jax/assets/demo_model).
Expected result (mAP % on the held-out demo benchmark, `python eval.py --dataset demo`):

                                     Easy  Medium  Hard
    cvnet_global (the stage-1 model) 69.03  53.84  23.34
    cvnet_rerank (this head, top 100) 74.07  57.72  24.60

The frozen demo backbone (width 16, 800 steps on 72 tile classes) hardly separates tiles
of the same photograph: on training pairs the head reaches ~0.96 accuracy on positives
but ~0.2 on hard negatives.

On your own photos (docs/own_photos.md: 200 steps on 58 classes, 14 held-out classes;
docs/results.md, "Stage 2 on your own photos"): the head separates the top-ranked
candidates only weakly (held-out AUC 0.61 in the top 20), so the tutorial reranks gently
and a little deeper than the default: `eval.py ... --topk 20 --config.cvnet.mix=0.2`
(chosen on held-out training classes; 64.08 against the global 63.83),
and for photos larger than the 160 px this head was trained on, `--config.cvnet.max_side=160`
(the verifier's working size; the global descriptors keep theirs).

Validation (`config.eval`): at steps 500 and 1000, cvnet_global and cvnet_rerank (top 20,
official protocol) on the demo benchmark or a folder set's held-out split; W/model_best is
the step with the best cvnet_rerank mAP (Medium; folder sets: all).

Variant `tiny` (`--config configs/demo_rerank.py:tiny`): the tiny stage-1 model of
configs/demo.py:tiny, 64x64 pairs, batch 8, a bank of 4 refreshed every 8 steps: seconds on
a CPU, for the mechanics (resume across a bank refresh), not for results.
"""
from scvnet_jax.configs import demo

TINY = {**demo.TINY, "batch_size": 8, "rerank.bank_refresh_steps": 8, "rerank.bank_k": 4}


def get_config(variant: str = ""):
    c = demo.get_config()
    c.stage = "cvnet_rerank"
    c.init_from = "runs/demo/model"      # the stage-1 run above
    c.total_steps = 1000
    c.batch_size = 32                    # pairs
    c.checkpoint_every_steps = 100
    c.log_every_steps = 10
    c.data.image_size = 160              # the demo views' size: 10x10 local features
    c.data.augment.area = (0.8, 1.0)     # pairs must share content to be verifiable
    c.rerank.positive_fraction = 0.5
    c.rerank.hard_ratio = (0.0, 0.5)
    c.rerank.hide_prob = (0.0, 0.2)
    c.rerank.bank_k = 10
    c.rerank.bank_refresh_steps = 250    # new augmented views of the bank every 250 steps
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.01
    c.optimizer.warmup_steps = 20
    c.eval.every_steps = 500             # validation at steps 500 and 1000: cvnet_global and
    c.eval.topk = 20                     # cvnet_rerank (top 20: ~30 s each on 2 CPU cores)
    return demo.apply_variant(c, variant, {"tiny": TINY})
