"""Data: benchmarks in the revisitop layout (`revisitop`), size-bucket batching
(`batching`), the demo set (`demo`), training sets as TFDS ArrayRecord (`builders`, CLI
`build`; read through `sources`) and training augmentation (`augment`).

`normalize` (the official input normalisation) lives in `scvnet_jax.images` and is
re-exported here as `scvnet_jax.data.normalize`.
"""
from __future__ import annotations

from scvnet_jax.images import MEAN_BGR, STD_BGR, normalize

__all__ = ["MEAN_BGR", "STD_BGR", "normalize"]
