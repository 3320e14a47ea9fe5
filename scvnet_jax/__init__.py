"""scvnet_jax: CVNet and SuperGlobal landmark retrieval in JAX/Flax.

    import scvnet_jax as sj
    model = sj.load("CVPR2022_CVNet_R50.pyth")      # or a converted model directory
    d = model.global_descriptor(images)              # (B, 2048), L2-normalised

Layers, each importing only those before it: `models` (Flax modules, `Arch`) ->
`convert` (checkpoints) -> `api` (`load`, `RetrievalModel`) -> `engine` (extraction and
search on every device) -> `rerank`, `metrics`, `evaluation`, `search`, `training` ->
the entry points `eval`, `train`. `errors` holds the one error type, `files` atomic
writes, `images` image reading.
"""
from scvnet_jax import data, mesh, metrics, models, rerank, search
from scvnet_jax.api import RetrievalModel, create, demo_model_path, load
from scvnet_jax.errors import CheckpointError, ConfigError, InputError, ScvnetError
from scvnet_jax.models.arch import Arch

__version__ = "0.1.0"
__all__ = ["load", "create", "demo_model_path", "RetrievalModel", "Arch", "ScvnetError",
           "CheckpointError", "InputError", "ConfigError", "data", "mesh", "metrics", "models",
           "rerank", "search", "__version__"]
