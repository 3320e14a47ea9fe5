"""Reproduce the official CVNet / SuperGlobal test scripts on ROxford5k or RParis6k.

Command (DATA in the revisitop layout):

    python eval.py --config configs/eval_revisitop.py --dataset roxford5k \
        --data_dir DATA --weights CVPR2022_CVNet_R50.pyth

Hardware: a GPU or TPU (CPU works, slowly: CVNet reranking of the top 100 is ~7,000
pairs per dataset). Every batch is split over the process's devices; on several hosts run
the same command on each with --distributed.
Expected result: the numbers the official `test.py` of sungonce/CVNet (cvnet_global,
cvnet_rerank with top-100 and the official protocol) and of ShihaoShao-GH/SuperGlobal
(superglobal_global, superglobal_rerank with M=400, K=9, beta=0.15) print for the same
weights. Equality of rankings is what tests/evaluation/test_pipelines.py checks on minirevisit; the full
benchmarks have not been run in this repository yet (no copy of the data here).

Add `--distractors DATA/revisitop1m/revisitop1m.txt` for +R1M, `--protocol blind` to
rerank without looking at labels.
"""
from scvnet_jax.evaluation.config import default_config


def get_config():
    return default_config()
