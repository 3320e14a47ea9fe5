"""Global-retrieval mAP of a model on a revisitop-layout benchmark, through the same pipeline
code and metrics as eval.py (used by train.py at the end of a run, and by the tests)."""
from __future__ import annotations

from scvnet_jax.data.revisitop import load_dataset
from scvnet_jax.evaluation.config import default_config
from scvnet_jax.evaluation.pipelines import PipelineResult, evaluate


def benchmark_config(**overrides):
    cfg = default_config()
    cfg.pipelines = ["cvnet_global"]
    cfg.cache_dir = ""
    cfg.bucket = 256          # small benchmark images: one size bucket, few compilations
    cfg.update(overrides)
    return cfg


def global_retrieval(model, data_dir, dataset: str = "demo", **overrides) -> PipelineResult:
    """The cvnet_global pipeline (3-scale CVNet-Global descriptors, exact search)."""
    if dataset == "demo":
        from scvnet_jax.data import demo
        demo.build_benchmark(data_dir)
    [result] = evaluate(benchmark_config(**overrides), model, load_dataset(data_dir, dataset))
    return result
