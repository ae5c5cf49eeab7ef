"""The device path: the whole data set held on the device as one uint8 tensor, augmented a
batch at a time (``batch_augment``), every sample with its own parameters."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import numpy as np
import torch

from scanclust.config import Config
from scanclust.data import batch_augment as B
from scanclust.data.datasets import ImageDataset
from scanclust.data.pipelines.base import (PARTNER, Augment, Batch, Batches, DataPath,
                                           draw_partners, index_batches, layout)
from scanclust.runtime import channels_last


class DeviceAugment(Augment):
    """Gather a batch's images from the device copy of the data set and augment them there."""

    def __init__(self, path: DevicePath, images: torch.Tensor, targets: torch.Tensor,
                 views: dict[str, str], neighbors: np.ndarray | None,
                 generator: torch.Generator | None, training: bool) -> None:
        self.path, self.images, self.targets = path, images, targets
        self.generator = generator
        self.nhwc = channels_last(path.cfg, path.device, training)
        self.table = (None if neighbors is None else
                      torch.from_numpy(np.ascontiguousarray(neighbors)).to(images.device))
        self.groups = by_kind(views)

    def __call__(self, batch: Batch) -> Batch:
        index = batch["index"]
        sources = {"": index}
        out = {"index": index, "label": self.targets[index]}
        if self.table is not None:
            sources[PARTNER] = out["neighbor_index"] = draw_partners(index, self.table,
                                                                     self.generator)
        return self.path.add_views(out, self.groups, lambda name: sources.get(name, index),
                                   self.images.__getitem__, self.generator, self.nhwc)


def by_kind(views: dict[str, str]) -> dict[str, list[str]]:
    """The view names of each kind: views of one kind share an augmentation call on their
    concatenated inputs (a third of the kernels of separate calls for a SCAN pair)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name, kind in views.items():
        groups[kind].append(name)
    return groups


class DevicePath(DataPath):
    """The data set as one uint8 tensor on the device, augmented a whole batch at a time."""

    name = "device"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        self._held: list[tuple[ImageDataset, torch.Tensor, torch.Tensor]] = []

    def _tensors(self, dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
        """The data set's images and labels on the device, converted once per data set."""
        for held, images, targets in self._held:
            if held is dataset:
                return images, targets
        size = self.cfg.data.resize or self.cfg.data.image_size
        images = dataset.as_uint8(size, progress=self.cfg.progress).to(self.device)
        targets = torch.from_numpy(dataset.targets).to(self.device)
        self._held.append((dataset, images, targets))
        return images, targets

    def add_views(self, out: Batch, groups: dict[str, list[str]], source: Callable[[str], Any],
                  images: Callable[[Any], torch.Tensor], generator: torch.Generator | None,
                  nhwc: bool) -> Batch:
        """Each kind's views in one call on the images of their ``source`` (rows, or decoded
        images), concatenated: into ``out`` as float NCHW (NHWC with ``nhwc``)."""
        for kind, names in groups.items():
            parts = [source(name) for name in names]
            x = images(parts[0] if len(parts) == 1 else torch.cat(parts))
            for name, view in zip(names, self.make(kind, x, generator).chunk(len(names))):
                out[name] = layout(view, nhwc)
        return out

    def make(self, kind: str, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One view kind of a uint8 batch, as float32 NCHW."""
        d, a = self.cfg.data, self.cfg.augment
        if kind == "simclr":
            return B.simclr_batch(x, a.simclr, d.image_size, d.mean, d.std, generator=generator)
        if kind == "strong":
            return B.strong_batch(x, a.strong, d.image_size, d.mean, d.std,
                                  random_crop=d.resize is not None, generator=generator)
        if kind == "eval":
            return B.eval_batch(x, d.image_size, d.mean, d.std)
        raise ValueError(f"unknown view kind {kind!r}")

    def augment(self, dataset: ImageDataset, views: dict[str, str],
                neighbors: np.ndarray | None = None,
                generator: torch.Generator | None = None,
                training: bool = True) -> DeviceAugment:
        images, targets = self._tensors(dataset)
        return DeviceAugment(self, images, targets, views, neighbors, generator, training)

    def batches(self, augment: Augment, batch_size: int, *, shuffle: bool, seed: int,
                train: bool, shard: bool = False) -> Batches:
        assert isinstance(augment, DeviceAugment)
        return index_batches(len(augment.images), batch_size, shuffle=shuffle, seed=seed,
                             train=train, shard=shard, device=self.device)

