"""Default evaluation settings (an ml_collections ConfigDict); configs/eval_*.py start from
these, and eval.py's flags and --config.* overrides change them."""
from __future__ import annotations

import os

import ml_collections


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "scvnet_jax")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "roxford5k"
    c.data_dir = ""
    c.weights = ""
    c.pipelines = ["cvnet_global", "cvnet_rerank", "superglobal_global", "superglobal_rerank"]
    c.ks = [1, 5, 10]

    c.cvnet = ml_collections.ConfigDict()
    c.cvnet.scales = [0.7071, 1.0, 1.4142]  # OpenCV-resized inputs of CVNet-Global
    c.cvnet.topk = 100                      # rerank depth
    c.cvnet.protocol = "official"           # "official" (label-aware, per E/M/H) or "blind"
    c.cvnet.mix = 0.5                       # score = similarity + mix * verification score

    c.superglobal = ml_collections.ConfigDict()
    c.superglobal.descriptor = ml_collections.ConfigDict(
        dict(scales=3, rgem=True, sgem=True, relup=True, gemp=True))
    c.superglobal.rerank = ml_collections.ConfigDict(dict(M=400, K=9, beta=0.15))

    c.distractors = ""       # revisitop1m.txt (one image path per line) for +R1M
    c.distractors_dir = ""   # folder those paths are relative to (default: the list's folder)

    c.output = "results.json"
    c.cache_dir = default_cache_dir()  # "" disables caching
    c.save_visuals = ""
    c.visuals_topn = 10

    c.dtype = "float32"      # "bfloat16" for speed on GPU/TPU (not bit-parity)
    c.batch_size = 8         # images (or rerank pairs) per device per batch
    c.bucket = 64            # pad image sizes up to multiples of this (1: exact sizes)
    c.feature_bucket = 4     # pad local-feature sizes for CVNet rerank scoring likewise
    c.chunk_size = 256       # images per cached chunk
    c.workers = 4            # image-decoding threads
    return c
