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

    After ``merge_clusters`` (``scan.overcluster``) the heads' ``outputs`` clusters are joined
    into ``num_clusters``: a merged cluster's logit is the largest of its members' logits, so
    every loss and prediction downstream sees K clusters, and an image's merged cluster is the
    one its most probable trained cluster joined, the assignment the merge was computed on.
    The sum of the members' probabilities (a log-sum-exp of their logits) was the first rule:
    on weak features, whose probabilities spread over many of the trained clusters, it pulled
    images into the merged clusters of many members, and on CIFAR-10 folders left 19 of 150
    merged clusters nearly empty where the merge had filled them all (none with this rule;
    benchmarks/RESULTS.md, "Over-clustering, then merging").
    """

    def __init__(self, backbone: nn.Module, num_clusters: int, num_heads: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_clusters = self.outputs = num_clusters
        self.num_heads = num_heads
        self.register_buffer("merge", None)  # [outputs, num_clusters] 0/1, once merged
        self.merge: torch.Tensor | None
        self.heads = nn.Linear(backbone.out_dim, num_heads * num_clusters)
        bound = 1 / backbone.out_dim ** 0.5  # each head initialised like its own nn.Linear
        nn.init.uniform_(self.heads.weight, -bound, bound)
        nn.init.uniform_(self.heads.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_heads(self.backbone(x))

    def forward_heads(self, features: torch.Tensor) -> torch.Tensor:
        """Heads only: used with cached features when the backbone is frozen."""
        logits = self.heads(features)
        logits = logits.view(len(features), self.num_heads, self.outputs).transpose(0, 1)
        if self.merge is None:
            return logits
        logits = logits.float()  # float32 also under autocast, as the unmerged loss sees it
        target = self.merge.argmax(1).expand_as(logits)
        merged = logits.new_full((*logits.shape[:-1], self.num_clusters), -torch.inf)
        return merged.scatter_reduce(-1, target, logits, "amax", include_self=False)

    def merge_clusters(self, mapping: list[int]) -> None:
        """Join the heads' clusters: trained cluster ``c`` becomes part of ``mapping[c]``."""
        if len(mapping) != self.outputs or min(mapping) < 0:
            raise ValueError(f"a merge of {self.outputs} clusters needs as many targets >= 0, "
                             f"got {mapping}")
        if len(set(mapping)) != max(mapping) + 1:  # a merged cluster with no member: no logit
            raise ValueError(f"a merge must give every merged cluster 0..{max(mapping)} a "
                             f"member, got {mapping}")
        merge = torch.zeros(self.outputs, max(mapping) + 1, device=self.heads.weight.device)
        merge[torch.arange(self.outputs), torch.as_tensor(mapping)] = 1.0
        self.merge = merge
        self.num_clusters = merge.shape[1]

    def merge_mapping(self) -> list[int] | None:
        """The ``mapping`` of ``merge_clusters``, or None if the clusters were not merged."""
        return None if self.merge is None else self.merge.argmax(1).tolist()

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
        rows = slice(index * self.outputs, (index + 1) * self.outputs)
        head = nn.Linear(self.heads.in_features, self.outputs)
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
