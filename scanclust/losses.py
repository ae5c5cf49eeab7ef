"""The three losses of SCAN: NT-Xent (pretext), the SCAN loss, and confidence-masked CE.

All losses compute in float32 whatever the autocast dtype of the logits: the SCAN loss takes a
log of a dot product of probabilities and the entropy of a batch mean, both of which lose
their meaning in bf16 when predictions become confident.

With ``global_batch=True`` (the training steps) each process passes its share of a batch split
over several processes (``scanclust.distributed``), and every term that looks across the batch
is taken over the whole global batch: the mean of the processes' losses is the loss of the
global batch, and DistributedDataParallel's average of their gradients is its gradient. In a
single process the flag changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scanclust import distributed

EPS = 1e-8


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
            global_batch: bool = False) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy for two batches of L2-normalised embeddings.

    Each of the 2B embeddings must pick out its partner among the other 2B - 1. With
    ``global_batch`` the candidates are the embeddings of all processes (gathered with their
    gradient), so every process's rows see the negatives of the whole global batch.
    """
    z1, z2 = z1.float(), z2.float()
    n = z1.shape[0]
    keys1, keys2 = (distributed.gather(z1), distributed.gather(z2)) if global_batch else (z1, z2)
    total = keys1.shape[0]
    offset = distributed.rank() * n if global_batch else 0
    logits = torch.cat([z1, z2]) @ torch.cat([keys1, keys2]).T / temperature
    # Local row i (of 2n) sits in column own[i] of the global 2N candidates and its partner in
    # the other view's column; both made on the device: no host copy inside a step.
    rows = torch.arange(2 * n, device=z1.device)
    own = offset + rows % n + (rows >= n) * total
    partner = offset + rows % n + (rows < n) * total
    logits = logits.scatter(1, own[:, None], float("-inf"))
    return F.cross_entropy(logits, partner)


def cluster_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Float32 softmax over the last (cluster) dimension.

    Computed with the clusters moved off the last axis: CPU softmax kernels are slow on a short
    last axis (measured on 2 cores: 464 us vs 36 us for [10, 512, 10]), which made the softmax
    the largest cost of a head-only SCAN step. The values are the same.
    """
    moved = logits.float().transpose(-1, -2).contiguous()
    return F.softmax(moved, dim=-2).transpose(-1, -2)


def batch_marginal(probs: torch.Tensor, global_batch: bool = False) -> torch.Tensor:
    """The batch-mean of probabilities ``[B, C]`` or ``[H, B, C]``: ``p̄`` per head; with
    ``global_batch`` the mean over the global batch of all processes (a sum with gradient)."""
    if not global_batch:
        return probs.mean(-2)
    return distributed.sum_with_grad(probs.sum(-2)) / (probs.shape[-2] * distributed.world_size())


def scan_loss(anchor_logits: torch.Tensor, neighbor_logits: torch.Tensor,
              entropy_weight: float, global_batch: bool = False,
              prior: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SCAN loss (paper eq. 2) per head: ``consistency - entropy_weight * entropy``.

    Logits are ``[B, C]`` or ``[H, B, C]``; returns ``(total, consistency, entropy)``, each a
    scalar or an ``[H]`` vector. consistency = -mean log <p(anchor), p(neighbor)>; entropy is
    that of the batch-mean prediction, which the loss maximises so that samples spread over
    the clusters instead of collapsing into one. With ``global_batch`` that mean is over the
    global batch of all processes (a sum with gradient): a share of 16 images out of 128 would
    otherwise push each process's own few samples apart.

    Maximising the entropy is minimising ``KL(p̄ || uniform)``: a prior that every cluster
    holds 1/C of the data. With ``prior`` (a distribution per head, ``[C]`` or ``[H, C]``, no
    gradient) the total is ``consistency + entropy_weight * KL(p̄ || prior)`` instead, which
    for a uniform prior is the paper's total plus the constant ``entropy_weight * log C``;
    ``entropy`` stays that of ``p̄`` (for the log).
    """
    p_anchor = cluster_probabilities(anchor_logits)
    p_neighbor = cluster_probabilities(neighbor_logits)
    similarity = (p_anchor * p_neighbor).sum(-1)
    consistency = -torch.log(similarity.clamp_min(EPS)).mean(-1)
    p_mean = batch_marginal(p_anchor, global_batch)
    entropy = -(p_mean * torch.log(p_mean.clamp_min(EPS))).sum(-1)
    if prior is None:
        return consistency - entropy_weight * entropy, consistency, entropy
    return consistency + entropy_weight * prior_divergence(p_mean, prior), consistency, entropy


def prior_divergence(p_mean: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """``KL(p̄ || prior)`` over the last (cluster) dimension."""
    return (p_mean * (torch.log(p_mean.clamp_min(EPS)) - torch.log(prior.clamp_min(EPS)))).sum(-1)


def per_cluster_mask(confidence: torch.Tensor, target: torch.Tensor, num_clusters: int,
                     fraction: float, global_batch: bool = False) -> torch.Tensor:
    """1.0 for the ``fraction`` most confident samples of each cluster in the batch, else 0.0.

    A cluster of n members in the batch gives its ``ceil(fraction * n)`` most confident ones
    (ties: the earlier sample), so every cluster that holds a sample is trained on, however
    unsure the model still is. Fixed shapes and no host sync: the batch is sorted by cluster,
    then by confidence within each, and a sample's rank in its cluster is its sorted position
    less the cluster's first. With ``global_batch`` the ranks are those in the global batch
    (every process's confidences gathered), and each process gets its own rows' mask.
    """
    local = len(confidence)
    if global_batch:
        total = local * distributed.world_size()
        confidence = distributed.gather_rows(confidence, total)
        target = distributed.gather_rows(target, total)
    by_confidence = torch.argsort(confidence, descending=True, stable=True)
    order = by_confidence[torch.argsort(target[by_confidence], stable=True)]
    counts = torch.zeros(num_clusters, device=target.device).scatter_add_(
        0, target, torch.ones_like(confidence))
    first = counts.cumsum(0) - counts
    position = torch.arange(len(order), device=target.device, dtype=counts.dtype)
    rank = torch.empty_like(position).scatter_(0, order, position - first[target[order]])
    mask = (rank < fraction * counts[target]).float()
    offset = distributed.rank() * local if global_batch else 0
    return mask[offset:offset + local]


def masked_cross_entropy(weak_logits: torch.Tensor, strong_logits: torch.Tensor,
                         threshold: float, class_balance: bool = True,
                         global_batch: bool = False,
                         fraction: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-label loss: cross-entropy on the strong view against confident weak-view labels.

    A sample is confident when its max softmax probability on the weak view exceeds
    ``threshold``; its pseudo label is the argmax. With ``fraction`` the samples trained on are
    instead each cluster's ``fraction`` most confident ones (``per_cluster_mask``). With
    ``class_balance`` each class present among the selected samples is weighted by the inverse
    of its count, so the loss is the mean over present classes of the per-class mean loss
    (clusters that are confident early would otherwise dominate).

    Returns ``(loss, count)``, both tensors: the weighted mean over the selected samples, as
    ``F.cross_entropy(..., weight=)`` on them would give, and their number. The mask weights
    every sample instead of selecting rows, so shapes never depend on the data and nothing
    waits for the host; with no selected sample the loss is 0 with zero gradients, a normal
    event early in training, which the caller skips and counts.

    With ``global_batch`` the class counts, the normaliser and the returned count are those of
    the global batch (sums without gradient: they come from the detached weak view), and the
    process's share of the loss is scaled by the number of processes, so that the processes'
    mean loss and mean gradient are those of the global batch.
    """
    reduce = distributed.reduce_sum if global_batch else (lambda x: x)
    probs = F.softmax(weak_logits.detach().float(), dim=-1)
    max_prob, target = probs.max(dim=-1)
    if fraction is None:
        mask = (max_prob > threshold).float()
    else:
        mask = per_cluster_mask(max_prob, target, probs.shape[-1], fraction, global_batch)
    per_sample = -F.log_softmax(strong_logits.float(), dim=-1).gather(1, target[:, None])[:, 0]
    weight = mask
    if class_balance:
        counts = torch.zeros(probs.shape[-1], device=mask.device).scatter_add_(0, target, mask)
        weight = mask * (1.0 / reduce(counts).clamp_min(1.0))[target]
    share = distributed.world_size() if global_batch else 1
    loss = share * (weight * per_sample).sum() / reduce(weight.sum()).clamp_min(EPS)
    return loss, reduce(mask.sum()).to(torch.long)
