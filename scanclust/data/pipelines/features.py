"""Cached-feature mode: with a frozen backbone, compute features once and train heads only.

When the backbone does not learn (the paper's ImageNet setting, or any pretrained backbone), a
SCAN or self-label step spends nearly all its time recomputing the same backbone features.
Here the eval view and ``M`` augmented views of every image go through the backbone once;
training then draws, per sample and step, one of the M augmented views' features. A 100-epoch
SCAN run on ImageNet becomes M + 1 inference passes plus seconds of linear-head training.
``engine.cache_features`` computes them; this path serves them like images.
"""

from __future__ import annotations

import numpy as np
import torch

from scanclust.data.datasets import ImageDataset
from scanclust.data.pipelines.base import (PARTNER, Augment, Batch, Batches, draw_partners,
                                           index_batches)


class FeatureAugment(Augment):
    """Views of cached features: ``eval`` is view 0, any other kind one of the M augmented
    views drawn per sample and step (view 0 when none was cached); with ``neighbors`` the
    ``neighbor`` view shows a partner drawn as on the image paths."""

    def __init__(self, path: FeaturePath, views: dict[str, str], neighbors: np.ndarray | None,
                 generator: torch.Generator | None) -> None:
        self.path, self.views, self.generator = path, views, generator
        store = path.features.device
        self.table = (None if neighbors is None else
                      torch.from_numpy(np.ascontiguousarray(neighbors)).to(store))
        # Features kept in host memory (ImageNet-size caches) are gathered on the host.
        self.on_device = store == path.device

    def _view(self, kind: str, index: torch.Tensor) -> torch.Tensor:
        features = self.path.features
        augmented = features.shape[0] - 1
        if kind == "eval" or augmented == 0:
            return features[0, index]
        pick = torch.randint(1, augmented + 1, index.shape, generator=self.generator,
                             device=index.device)
        return features[pick, index]

    def __call__(self, batch: Batch) -> Batch:
        index = batch["index"].to(self.path.features.device)
        out = {"index": index, "label": self.path.targets[index]}
        other = index
        if self.table is not None:
            other = out["neighbor_index"] = draw_partners(index, self.table, self.generator)
        for name, kind in self.views.items():
            out[name] = self._view(kind, other if name == PARTNER and self.table is not None
                                   else index)
        return {k: v.to(self.path.device, torch.float32 if v.is_floating_point() else v.dtype,
                        non_blocking=True) for k, v in out.items()}


class FeaturePath:
    """Cached features ``[1 + M, N, D]`` served like an image data path: ``augment`` and
    ``batches`` as there (the data set only names what the features are of)."""

    name = "cached"

    def __init__(self, features: torch.Tensor, targets: torch.Tensor,
                 device: torch.device) -> None:
        self.features = features
        self.targets = targets
        self.device = device

    def augment(self, dataset: ImageDataset, views: dict[str, str],
                neighbors: np.ndarray | None = None, generator: torch.Generator | None = None,
                training: bool = True) -> FeatureAugment:
        return FeatureAugment(self, views, neighbors, generator)

    def batches(self, augment: Augment, batch_size: int, *, shuffle: bool, seed: int,
                train: bool, shard: bool = False) -> Batches:
        return index_batches(self.features.shape[1], batch_size, shuffle=shuffle, seed=seed,
                             train=train, shard=shard, device=self.features.device)


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

