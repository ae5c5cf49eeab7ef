"""The two models SCAN trains on top of a backbone: the SimCLR model and the cluster model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ContrastiveModel(nn.Module):
    """Backbone + SimCLR projection MLP (out_dim -> hidden -> proj_dim), L2-normalised output."""

    def __init__(self, backbone: nn.Module, hidden: int = 512, proj_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.Linear(backbone.out_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)


class ClusterModel(nn.Module):
    """Backbone + ``num_heads`` linear heads of ``num_clusters`` outputs each.

    Several heads train in parallel from one backbone pass (the paper uses 10 on ImageNet) and
    the one with the lowest SCAN loss is kept. The heads are one ``Linear`` with
    ``num_heads * num_clusters`` outputs, a single matmul instead of one per head; ``forward``
    returns logits ``[H, B, C]``.
    """

    def __init__(self, backbone: nn.Module, num_clusters: int, num_heads: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_clusters = num_clusters
        self.num_heads = num_heads
        self.heads = nn.Linear(backbone.out_dim, num_heads * num_clusters)
        bound = 1 / backbone.out_dim ** 0.5  # each head initialised like its own nn.Linear
        nn.init.uniform_(self.heads.weight, -bound, bound)
        nn.init.uniform_(self.heads.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_heads(self.backbone(x))

    def forward_heads(self, features: torch.Tensor) -> torch.Tensor:
        """Heads only: used with cached features when the backbone is frozen."""
        logits = self.heads(features)
        return logits.view(len(features), self.num_heads, self.num_clusters).transpose(0, 1)

    def freeze_backbone(self) -> None:
        """Fix the backbone's weights and batch-norm statistics (the paper's ImageNet setting)."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()

    def train_mode(self, update_backbone: bool) -> None:
        """Training mode, with a frozen backbone's batch norm kept in eval mode."""
        self.train()
        if not update_backbone:
            self.backbone.eval()

    def keep_head(self, index: int) -> None:
        """Drop all heads but ``index`` (self-label continues from the best SCAN head)."""
        rows = slice(index * self.num_clusters, (index + 1) * self.num_clusters)
        head = nn.Linear(self.heads.in_features, self.num_clusters)
        head = head.to(self.heads.weight.device, self.heads.weight.dtype)
        with torch.no_grad():
            head.weight.copy_(self.heads.weight[rows])
            head.bias.copy_(self.heads.bias[rows])
        self.heads, self.num_heads = head, 1


class Heads(nn.Module):
    """A cluster model's heads as a module of their own: cached features train through it, and
    DistributedDataParallel needs a module to wrap (the frozen backbone's weights stay out of
    its gradient all-reduce, since they need no gradient)."""

    def __init__(self, model: ClusterModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.forward_heads(features)


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` entries of a model state dict, prefix removed."""
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
