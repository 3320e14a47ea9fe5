"""Flax models. `cvnet.CVNet` is the whole official model (ResNet `encoder_q`, `conv2ds`,
`cv_learner`); `resnet` holds the backbone; `Arch` names an architecture; `csa` is the CSA
reranker's transformer (`csa.RerankTransformer`, `csa.CSAArch`); `detector` is AMES's
local-feature detector head (`detector.SpatialAttention2d`); `ames` the AMES reranker's
transformer (`ames.AMES`, `ames.AMESArch`).

This package imports nothing else of scvnet_jax: loading weights lives in
`scvnet_jax.convert`, running models on devices in `scvnet_jax.api` and `scvnet_jax.engine`.
Flax is imported on first use of a model (`Arch` alone needs none)."""
from __future__ import annotations

import importlib

from scvnet_jax.models.arch import Arch

_SUBMODULES = ("ames", "csa", "cvnet", "detector", "ops", "resnet")
_NAMES = {"CVNet": "cvnet", "CVLearner": "cvnet", "CenterPivotConv4d": "cvnet",
          "ResNet": "resnet"}
__all__ = ["ames", "csa", "cvnet", "detector", "ops", "resnet", "Arch", "CVNet", "CVLearner", "CenterPivotConv4d", "ResNet"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"scvnet_jax.models.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"scvnet_jax.models.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'scvnet_jax.models' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
