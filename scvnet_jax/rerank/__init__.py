"""Rerankers: SuperGlobal (`superglobal`) and CVNet (`cvnet.official`, `cvnet.blind`)."""
from scvnet_jax.rerank import cvnet
from scvnet_jax.rerank.superglobal import superglobal

__all__ = ["cvnet", "superglobal"]
