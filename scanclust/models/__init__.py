"""Networks: backbones and the SimCLR / cluster models built on them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scanclust.models.backbones import TinyResNet, build_backbone
from scanclust.models.heads import ClusterModel, ContrastiveModel, Heads, backbone_state

if TYPE_CHECKING:
    from scanclust.config import Config

__all__ = ["ClusterModel", "ContrastiveModel", "Heads", "TinyResNet", "backbone_state",
           "build_backbone", "build_cluster_model", "build_contrastive_model"]


def build_contrastive_model(cfg: Config) -> ContrastiveModel:
    """The pretext model of ``cfg``: its backbone with the SimCLR projection head."""
    backbone = build_backbone(cfg.model.backbone, cfg.model.width)
    return ContrastiveModel(backbone, cfg.model.proj_hidden, cfg.model.proj_dim)


def build_cluster_model(cfg: Config, clusters: int, heads: int) -> ClusterModel:
    """The cluster model of ``cfg``: its backbone with ``heads`` heads of ``clusters``."""
    return ClusterModel(build_backbone(cfg.model.backbone, cfg.model.width), clusters, heads)
