"""The official pipelines on ../shared/minirevisit (60 real photographs, 6 queries), CPU-sized.

Command (weights: the R50 parity checkpoint, seed 0, random but deterministic):

    python ../shared/parity/make_checkpoint.py ../shared/parity/cvnet_r50_keys.json 0 r50_seed0.pyth
    python eval.py --config configs/eval_minirevisit.py --weights r50_seed0.pyth

Expected result (about 3 minutes on 2 CPU cores; mAP E / M / H, percent), identical to the
official CVNet and SuperGlobal test scripts on the same folder (tests/evaluation/test_pipelines.py):

    cvnet_global        74.71  70.39  68.74
    cvnet_rerank        43.50  43.55  25.28   (top-10, official protocol)
    superglobal_global  74.07  68.44  67.12
    superglobal_rerank  59.20  61.65  57.59

The images are small and all of different sizes; the default padded shapes chosen from
the data (`--bucket auto --feature_bucket auto`) run this cold in 194 CPU-s against 306 with
the coarse buckets 256 / 16 this config used to set (2-core Xeon, 2026-12-07; identical
rankings).
"""
import os
from pathlib import Path

from scvnet_jax.evaluation.config import default_config


def get_config():
    c = default_config()
    c.dataset = "roxford5k"
    # ../shared beside the checkout (SCVNET_SHARED if it lives elsewhere)
    shared = os.environ.get("SCVNET_SHARED") or Path(__file__).resolve().parents[2] / "shared"
    c.data_dir = str(Path(shared) / "minirevisit")
    c.cvnet.topk = 10
    return c
