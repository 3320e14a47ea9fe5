"""Flax models. `cvnet.CVNet` is the whole official model (ResNet `encoder_q`, `conv2ds`,
`cv_learner`); `resnet` holds the backbone."""
from scvnet_jax.models import cvnet, ops, resnet
from scvnet_jax.models.cvnet import CVNet, CVLearner, CenterPivotConv4d
from scvnet_jax.models.resnet import ResNet

__all__ = ["cvnet", "ops", "resnet", "CVNet", "CVLearner", "CenterPivotConv4d", "ResNet"]
