"""Data paths: how a stage gets its batches of augmented views.

Two interchangeable paths yield the same batch dicts (view tensors, ``index``, ``label``):

- ``WorkerPath``: per-sample torchvision transforms in DataLoader workers. Works for any data
  set, including ImageNet-size folders that do not fit in memory.
- ``DevicePath``: the whole data set held on the device as one uint8 tensor and augmented a
  batch at a time (``batch_augment``), every sample with its own parameters. No decoding, no
  worker processes, no host-to-device copies: on a GPU the data path stops being the bottleneck.

``data_path_for`` picks one from ``perf.data_path`` (``auto`` takes the device path when the
data set fits under ``perf.device_data_gb``).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from scanclust.config import Config
from scanclust.data import batch_augment as B
from scanclust.data.datasets import ImageDataset
from scanclust.data.loaders import NeighborsDataset, ViewsDataset, make_loader, num_batches
from scanclust.data.transforms import view_transform

Batch = dict[str, torch.Tensor]


class Batches:
    """An epoch's worth of batches with a known length (for progress bars)."""

    def __init__(self, iterator: Iterator[Batch], length: int) -> None:
        self._iterator = iterator
        self._length = length

    def __iter__(self) -> Iterator[Batch]:
        return self._iterator

    def __len__(self) -> int:
        return self._length


class WorkerPath:
    """Per-sample transforms of PIL images in DataLoader workers."""

    name = "workers"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.pin_memory = device.type == "cuda"

    def views(self, dataset: ImageDataset, views: dict[str, str], batch_size: int, *,
              shuffle: bool, seed: int, train: bool) -> Batches:
        transforms = {name: view_transform(self.cfg, kind) for name, kind in views.items()}
        ds = ViewsDataset(dataset, transforms)
        loader = make_loader(ds, batch_size, shuffle=shuffle, seed=seed,
                             num_workers=self.cfg.data.num_workers, pin_memory=self.pin_memory,
                             train=train)
        return Batches(iter(loader), len(loader))

    def pairs(self, dataset: ImageDataset, neighbors: np.ndarray, kind: str, batch_size: int, *,
              seed: int) -> Batches:
        t = view_transform(self.cfg, kind)
        loader = make_loader(NeighborsDataset(dataset, neighbors, t, t), batch_size, shuffle=True,
                             seed=seed, num_workers=self.cfg.data.num_workers,
                             pin_memory=self.pin_memory, train=True)
        return Batches(iter(loader), len(loader))


class DevicePath:
    """The data set as one uint8 tensor on the device, augmented a whole batch at a time."""

    name = "device"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
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

    def _augment(self, kind: str, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        d, a = self.cfg.data, self.cfg.augment
        if kind == "simclr":
            return B.simclr_batch(x, a.simclr, d.image_size, d.mean, d.std, generator=generator)
        if kind == "strong":
            return B.strong_batch(x, a.strong, d.image_size, d.mean, d.std,
                                  random_crop=d.resize is not None, generator=generator)
        if kind == "eval":
            return B.eval_batch(x, d.image_size, d.mean, d.std)
        raise ValueError(f"unknown view kind {kind!r}")

    def _order(self, n: int, shuffle: bool, seed: int) -> torch.Tensor:
        if not shuffle:
            return torch.arange(n, device=self.device)
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(self.device)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def views(self, dataset: ImageDataset, views: dict[str, str], batch_size: int, *,
              shuffle: bool, seed: int, train: bool) -> Batches:
        images, targets = self._tensors(dataset)
        batch_size, count = num_batches(len(dataset), batch_size, train)
        order, generator = self._order(len(dataset), shuffle, seed), self._generator(seed)

        def iterate() -> Iterator[Batch]:
            for b in range(count):
                idx = order[b * batch_size:(b + 1) * batch_size]
                x = images[idx]
                batch = {name: self._augment(kind, x, generator) for name, kind in views.items()}
                yield {**batch, "index": idx, "label": targets[idx]}

        return Batches(iterate(), count)

    def pairs(self, dataset: ImageDataset, neighbors: np.ndarray, kind: str, batch_size: int, *,
              seed: int) -> Batches:
        images, targets = self._tensors(dataset)
        table = torch.from_numpy(np.ascontiguousarray(neighbors)).to(self.device)
        batch_size, count = num_batches(len(dataset), batch_size, True)
        order, generator = self._order(len(dataset), True, seed), self._generator(seed)

        def iterate() -> Iterator[Batch]:
            for b in range(count):
                idx = order[b * batch_size:(b + 1) * batch_size]
                if table.shape[1] == 0:  # K = 0: the anchor's own second augmentation
                    other = idx
                else:
                    pick = torch.randint(table.shape[1], (len(idx), 1), device=self.device,
                                         generator=generator)
                    other = table[idx].gather(1, pick).squeeze(1)
                yield {"anchor": self._augment(kind, images[idx], generator),
                       "neighbor": self._augment(kind, images[other], generator),
                       "index": idx, "neighbor_index": other, "label": targets[idx]}

        return Batches(iterate(), count)


def fits_on_device(cfg: Config, dataset: ImageDataset) -> bool:
    """Whether ``auto`` should hold this data set on the device: its uint8 images at the stored
    size (``data.resize`` or ``data.image_size``) take at most ``perf.device_data_gb``."""
    size = cfg.data.resize or cfg.data.image_size
    return len(dataset) * 3 * size * size <= cfg.perf.device_data_gb * 1e9


def data_path_for(cfg: Config, device: torch.device,
                  dataset: ImageDataset) -> WorkerPath | DevicePath:
    choice = cfg.perf.data_path
    if choice == "auto":
        choice = "device" if fits_on_device(cfg, dataset) else "workers"
    return DevicePath(cfg, device) if choice == "device" else WorkerPath(cfg, device)
