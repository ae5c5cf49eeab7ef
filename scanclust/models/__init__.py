"""Networks: backbones and the SimCLR / cluster models built on them."""

from scanclust.models.backbones import TinyResNet, build_backbone
from scanclust.models.heads import ClusterModel, ContrastiveModel, backbone_state

__all__ = ["ClusterModel", "ContrastiveModel", "TinyResNet", "backbone_state", "build_backbone"]
