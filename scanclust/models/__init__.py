"""Networks: backbones and the SimCLR / cluster models built on them."""

from scanclust.models.backbones import TinyResNet, build_backbone
from scanclust.models.heads import ClusterModel, ContrastiveModel, Heads, backbone_state

__all__ = ["ClusterModel", "ContrastiveModel", "Heads", "TinyResNet", "backbone_state",
           "build_backbone"]
