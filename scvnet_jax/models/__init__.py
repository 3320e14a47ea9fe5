"""Flax models. `cvnet.CVNet` is the whole official model (ResNet `encoder_q`, `conv2ds`,
`cv_learner`); `resnet` holds the backbone; `Arch` names an architecture.

This package imports nothing else of scvnet_jax: loading weights lives in
`scvnet_jax.convert`, running models on devices in `scvnet_jax.api` and `scvnet_jax.engine`."""
from scvnet_jax.models import cvnet, ops, resnet
from scvnet_jax.models.arch import Arch
from scvnet_jax.models.cvnet import CVNet, CVLearner, CenterPivotConv4d
from scvnet_jax.models.resnet import ResNet

__all__ = ["cvnet", "ops", "resnet", "Arch", "CVNet", "CVLearner", "CenterPivotConv4d", "ResNet"]
