"""The three losses of SCAN: NT-Xent (pretext), the SCAN loss, and confidence-masked CE.

All losses compute in float32 whatever the autocast dtype of the logits: the SCAN loss takes a
log of a dot product of probabilities and the entropy of a batch mean, both of which lose
their meaning in bf16 when predictions become confident.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy for two batches of L2-normalised embeddings.

    Each of the 2B embeddings must pick out its partner among the other 2B - 1.
    """
    z = torch.cat([z1, z2]).float()
    n = z1.shape[0]
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_pairs, float("-inf"))
    # Row i's partner is i + n (mod 2n), made on the device: no host copy inside a step.
    target = torch.arange(2 * n, device=z.device).add_(n).remainder_(2 * n)
    return F.cross_entropy(logits, target)


def cluster_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Float32 softmax over the last (cluster) dimension.

    Computed with the clusters moved off the last axis: CPU softmax kernels are slow on a short
    last axis (measured on 2 cores: 464 us vs 36 us for [10, 512, 10]), which made the softmax
    the largest cost of a head-only SCAN step. The values are the same.
    """
    moved = logits.float().transpose(-1, -2).contiguous()
    return F.softmax(moved, dim=-2).transpose(-1, -2)


def scan_loss(anchor_logits: torch.Tensor, neighbor_logits: torch.Tensor,
              entropy_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SCAN loss (paper eq. 2) per head: ``consistency - entropy_weight * entropy``.

    Logits are ``[B, C]`` or ``[H, B, C]``; returns ``(total, consistency, entropy)``, each a
    scalar or an ``[H]`` vector. consistency = -mean log <p(anchor), p(neighbor)>; entropy is
    that of the batch-mean prediction, which the loss maximises so that samples spread over
    the clusters instead of collapsing into one.
    """
    p_anchor = cluster_probabilities(anchor_logits)
    p_neighbor = cluster_probabilities(neighbor_logits)
    similarity = (p_anchor * p_neighbor).sum(-1)
    consistency = -torch.log(similarity.clamp_min(EPS)).mean(-1)
    p_mean = p_anchor.mean(-2)
    entropy = -(p_mean * torch.log(p_mean.clamp_min(EPS))).sum(-1)
    return consistency - entropy_weight * entropy, consistency, entropy


def masked_cross_entropy(weak_logits: torch.Tensor, strong_logits: torch.Tensor,
                         threshold: float,
                         class_balance: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-label loss: cross-entropy on the strong view against confident weak-view labels.

    A sample is confident when its max softmax probability on the weak view exceeds
    ``threshold``; its pseudo label is the argmax. With ``class_balance`` each class present
    among the confident samples is weighted by the inverse of its count, so the loss is the
    mean over present classes of the per-class mean loss (clusters that are confident early
    would otherwise dominate).

    Returns ``(loss, count)``, both tensors: the weighted mean over the confident samples, as
    ``F.cross_entropy(..., weight=)`` on them would give, and their number. The mask weights
    every sample instead of selecting rows, so shapes never depend on the data and nothing
    waits for the host; with no confident sample the loss is 0 with zero gradients, a normal
    event early in training, which the caller skips and counts.
    """
    probs = F.softmax(weak_logits.detach().float(), dim=-1)
    max_prob, target = probs.max(dim=-1)
    mask = (max_prob > threshold).float()
    per_sample = -F.log_softmax(strong_logits.float(), dim=-1).gather(1, target[:, None])[:, 0]
    weight = mask
    if class_balance:
        counts = torch.zeros(probs.shape[-1], device=mask.device).scatter_add_(0, target, mask)
        weight = mask * (1.0 / counts.clamp_min(1.0))[target]
    loss = (weight * per_sample).sum() / weight.sum().clamp_min(EPS)
    return loss, mask.sum().to(torch.long)
