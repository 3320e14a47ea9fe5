"""scvnet_jax: CVNet and SuperGlobal landmark retrieval in JAX/Flax.

    import scvnet_jax as sj
    model = sj.load("CVPR2022_CVNet_R50.pyth")      # or a converted model directory
    d = model.global_descriptor(images)              # (B, 2048), L2-normalised
"""
from scvnet_jax import data, metrics, models, rerank, search
from scvnet_jax.api import RetrievalModel, create, demo_model_path, load
from scvnet_jax.convert import CheckpointError

__version__ = "0.1.0"
__all__ = ["load", "create", "demo_model_path", "RetrievalModel", "CheckpointError", "data", "metrics",
           "models", "rerank", "search", "__version__"]
