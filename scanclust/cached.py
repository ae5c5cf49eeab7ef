"""Cached-feature mode: with a frozen backbone, compute features once and train heads only.

When the backbone does not learn (the paper's ImageNet setting, or any pretrained backbone), a
SCAN or self-label step spends nearly all its time recomputing the same backbone features.
Here the eval view and ``M`` augmented views of every image go through the backbone once;
training then draws, per sample and step, one of the M augmented views' features. A 100-epoch
SCAN run on ImageNet becomes M + 1 inference passes plus seconds of linear-head training.
"""

from __future__ import annotations

import torch
from torch import nn

from scanclust.data.datasets import ImageDataset
from scanclust.data.paths import Batch, Batches, DevicePath, WorkerPath, num_batches
from scanclust.runtime import autocast, derive_seed
from scanclust.training import progress, to_device


@torch.no_grad()
def cache_features(backbone: nn.Module, data: WorkerPath | DevicePath, dataset: ImageDataset,
                   kind: str, views: int, batch_size: int, device: torch.device, amp: bool,
                   seed: int, store: tuple[torch.device, torch.dtype],
                   show: bool) -> torch.Tensor:
    """Backbone features ``[1 + views, N, D]``: index 0 is the eval view, 1.. are ``kind`` views,
    kept on ``store`` = (device, dtype) as chosen by ``feature_store``."""
    backbone.eval()
    out: torch.Tensor | None = None
    for v in range(views + 1):
        batches = data.views(dataset, {"image": "eval" if v == 0 else kind}, batch_size,
                             shuffle=False, seed=derive_seed(seed, "cache", v), train=False)
        start = 0
        for batch in progress(batches, show, f"features view {v}/{views}"):
            images = to_device(batch, device)["image"]
            with autocast(device, amp):
                f = backbone(images).to(*store)
            if out is None:
                out = torch.empty(views + 1, len(dataset), f.shape[1], dtype=store[1],
                                  device=store[0])
            out[v, start:start + len(f)] = f
            start += len(f)
    assert out is not None
    return out


class FeaturePath:
    """Batches of cached features shaped like an image data path's batches."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor,
                 device: torch.device) -> None:
        self.features = features
        self.targets = targets
        self.device = device

    def _augmented(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One random augmented view per sample (the eval view 0 when none was cached)."""
        views = self.features.shape[0] - 1
        if views == 0:
            return self.features[0, idx]
        pick = torch.randint(1, views + 1, idx.shape, generator=generator, device=idx.device)
        return self.features[pick, idx]

    def _order(self, seed: int) -> tuple[torch.Tensor, torch.Generator]:
        n = self.features.shape[1]
        generator = torch.Generator(device=self.features.device).manual_seed(seed)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return order.to(self.features.device), generator

    def _out(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, torch.float32 if v.is_floating_point() else v.dtype,
                        non_blocking=True) for k, v in batch.items()}

    def pairs(self, neighbors: torch.Tensor, batch_size: int, *, seed: int) -> Batches:
        """Anchor and uniformly drawn neighbour, each under its own random cached view."""
        n = self.features.shape[1]
        batch_size, count = num_batches(n, batch_size, True)
        order, generator = self._order(seed)
        table = neighbors.to(self.features.device)

        def iterate():
            for b in range(count):
                idx = order[b * batch_size:(b + 1) * batch_size]
                if table.shape[1] == 0:
                    other = idx
                else:
                    pick = torch.randint(table.shape[1], (len(idx), 1), generator=generator,
                                         device=idx.device)
                    other = table[idx].gather(1, pick).squeeze(1)
                yield self._out({"anchor": self._augmented(idx, generator),
                                 "neighbor": self._augmented(other, generator),
                                 "index": idx, "label": self.targets[idx]})

        return Batches(iterate(), count)

    def weak_strong(self, batch_size: int, *, seed: int) -> Batches:
        """Self-label batches: eval-view features as ``weak``, an augmented view as ``strong``."""
        n = self.features.shape[1]
        batch_size, count = num_batches(n, batch_size, True)
        order, generator = self._order(seed)

        def iterate():
            for b in range(count):
                idx = order[b * batch_size:(b + 1) * batch_size]
                yield self._out({"weak": self.features[0, idx],
                                 "strong": self._augmented(idx, generator),
                                 "index": idx, "label": self.targets[idx]})

        return Batches(iterate(), count)


def feature_store(limit_gb: float, views: int, n: int, dim: int,
                  device: torch.device) -> tuple[torch.device, torch.dtype]:
    """Where and how to keep ``(views + 1) x n x dim`` features.

    On a GPU: float16 (half the memory traffic of a gather) on the GPU when it fits in
    ``limit_gb``, else in host memory (ImageNet-1k with 10 views is 58 GB). On the CPU:
    float32 when it fits, since converting half floats costs a CPU more than it saves.
    """
    half = (views + 1) * n * dim * 2
    if device.type != "cpu":
        return (device if half <= limit_gb * 1e9 else torch.device("cpu")), torch.float16
    return torch.device("cpu"), torch.float32 if 2 * half <= limit_gb * 1e9 else torch.float16
