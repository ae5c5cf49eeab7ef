"""Data paths: how a stage gets its batches of augmented views.

A stage asks a data path for two things, once per stage and once per epoch:

- ``augment(dataset, views, neighbors)``: a callable that turns one batch, as the path yields
  it, into named views on the device (``{"view1": "simclr", "view2": "simclr"}`` for the
  pretext; ``{"anchor": kind, "neighbor": kind}`` with the mined ``neighbors`` for SCAN, where
  the ``neighbor`` view shows a partner drawn per sample; ``{"weak": "eval", "strong": kind}``
  for self-label). It depends on nothing that changes between epochs, so a training step that
  calls it can be captured once as a CUDA graph and replayed (``scanclust.step``).
- ``batches(augment, batch_size, shuffle=, seed=, train=, shard=)``: an epoch's batches for
  it. Under torchrun a training batch is this process's share of the global batch of
  ``batch_size`` (``distributed.local_batch``); with ``shard`` (inference) each process gets its
  own part of the data set (``distributed.shard_indices``) to gather afterwards.

Three interchangeable paths implement this:

- ``WorkerPath``: per-sample torchvision transforms in DataLoader workers; batches carry the
  finished views and ``augment`` only moves them to the device. Works for any data set,
  including ImageNet-size folders that do not fit in memory.
- ``DevicePath``: the whole data set held on the device as one uint8 tensor. Batches are index
  tensors; ``augment`` gathers the images and augments them a batch at a time
  (``batch_augment``), every sample with its own parameters, with one call per view kind (the
  two SimCLR views, or a SCAN anchor and its partner, are one call on twice the batch). No
  decoding, no worker processes, no host-to-device copies, no host synchronisation.
- ``DecodePath`` (``decode.py``): image files read by DataLoader workers as bytes, decoded on
  the device a batch at a time, then augmented as on the device path.

Training steps draw their random numbers from the device's default generator, which the stages
reseed every epoch; ``views`` (inference, cached features, tests) seeds a generator of its own.
``data_path_for`` picks a path from ``perf.data_path`` (``auto`` takes the device path when the
data set fits under ``perf.device_data_gb``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from scanclust import distributed
from scanclust.config import Config
from scanclust.data import batch_augment as B
from scanclust.data.datasets import ImageDataset
from scanclust.data.loaders import SeededSampler, ViewsDataset, make_loader, num_batches
from scanclust.data.transforms import view_transform
from scanclust.runtime import channels_last, process_seed

Batch = dict[str, torch.Tensor]
PARTNER = "neighbor"  # the view that shows the drawn partner when neighbours are given


class Batches:
    """An epoch's worth of batches with a known length (for progress bars)."""

    def __init__(self, iterator: Iterator[Batch], length: int) -> None:
        self._iterator = iterator
        self._length = length

    def __iter__(self) -> Iterator[Batch]:
        return self._iterator

    def __len__(self) -> int:
        return self._length


def to_device(batch: Batch, device: torch.device, channels_last: bool = False) -> Batch:
    """Move a batch to the device; image tensors become NHWC when ``channels_last``."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if channels_last and value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def layout(view: torch.Tensor, nhwc: bool) -> torch.Tensor:
    return view.contiguous(memory_format=torch.channels_last) if nhwc else view


def draw_partners(index: torch.Tensor, table: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
    """One partner per sample, uniform over its row of ``table`` [N, K]; K = 0 pairs each
    sample with itself (the paper's K = 0 ablation: the partner is another augmentation)."""
    if table.shape[1] == 0:
        return index
    pick = torch.randint(table.shape[1], (len(index), 1), device=index.device,
                         generator=generator)
    return table[index].gather(1, pick).squeeze(1)


class Augment:
    """Turns a batch as its data path yields it into named views on the device."""

    #: Whether everything ``__call__`` does runs on the device, so that a CUDA graph can hold it.
    on_device = True

    def __call__(self, batch: Batch) -> Batch:
        raise NotImplementedError


class WorkerAugment(Augment):
    """The worker path's views are made in the workers; here they only reach the device."""

    def __init__(self, dataset: ImageDataset, views: dict[str, str],
                 neighbors: np.ndarray | None, device: torch.device, channels_last: bool) -> None:
        self.dataset, self.views, self.neighbors = dataset, views, neighbors
        self.device, self.channels_last = device, channels_last
        self.loaders: dict[tuple, DataLoader] = {}  # kept for their persistent workers

    def __call__(self, batch: Batch) -> Batch:
        return to_device(batch, self.device, self.channels_last)


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
        # One augmentation call per view kind: views of one kind share a call on the
        # concatenated inputs (a third of the kernels of separate calls for a SCAN pair).
        self.groups: dict[str, list[str]] = defaultdict(list)
        for name, kind in views.items():
            self.groups[kind].append(name)

    def __call__(self, batch: Batch) -> Batch:
        index = batch["index"]
        sources = {"": index}
        out = {"index": index, "label": self.targets[index]}
        if self.table is not None:
            sources[PARTNER] = out["neighbor_index"] = draw_partners(index, self.table,
                                                                     self.generator)
        for kind, names in self.groups.items():
            rows = [sources.get(name, index) for name in names]
            x = self.images[rows[0] if len(rows) == 1 else torch.cat(rows)]
            views = self.path.make(kind, x, self.generator)
            for name, view in zip(names, views.chunk(len(names))):
                out[name] = layout(view, self.nhwc)
        return out


class DataPath:
    """What both paths share: materialised views for inference and feature caching."""

    name = "base"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device

    def augment(self, dataset: ImageDataset, views: dict[str, str],
                neighbors: np.ndarray | None = None,
                generator: torch.Generator | None = None, training: bool = True) -> Augment:
        """``training``: views for a training step (else for inference, which may take
        another memory layout: ``runtime.channels_last``)."""
        raise NotImplementedError

    def batches(self, augment: Augment, batch_size: int, *, shuffle: bool, seed: int,
                train: bool, shard: bool = False) -> Batches:
        raise NotImplementedError

    def views(self, dataset: ImageDataset, views: dict[str, str], batch_size: int, *,
              shuffle: bool, seed: int, train: bool, shard: bool = False) -> Batches:
        """Finished batches of ``views``; the draws follow ``seed`` (and the process's place
        when each process makes its own ``shard``) alone."""
        own_seed = process_seed(seed) if shard else seed
        generator = torch.Generator(device=self.device).manual_seed(own_seed)
        augment = self.augment(dataset, views, generator=generator, training=False)
        batches = self.batches(augment, batch_size, shuffle=shuffle, seed=seed, train=train,
                               shard=shard)
        return Batches((augment(b) for b in batches), len(batches))


class WorkerPath(DataPath):
    """Per-sample transforms of PIL images in DataLoader workers."""

    name = "workers"

    def augment(self, dataset: ImageDataset, views: dict[str, str],
                neighbors: np.ndarray | None = None,
                generator: torch.Generator | None = None,
                training: bool = True) -> WorkerAugment:
        return WorkerAugment(dataset, views, neighbors, self.device,
                             channels_last(self.cfg, self.device, training))

    def batches(self, augment: Augment, batch_size: int, *, shuffle: bool, seed: int,
                train: bool, shard: bool = False) -> Batches:
        """Training batches come from a ``DistributedSampler`` (one process: all samples) in
        this process's share of the global batch size; inference batches of ``shard`` cover
        this process's ``shard_indices``."""
        assert isinstance(augment, WorkerAugment)
        key = (batch_size, shuffle, train, shard)
        if key not in augment.loaders:
            augment.loaders[key] = self._loader(augment, batch_size, shuffle, train, shard)
        loader = augment.loaders[key]
        loader.sampler.set_seed(seed)
        return Batches(iter(loader), len(loader))

    def _loader(self, augment: WorkerAugment, batch_size: int, shuffle: bool, train: bool,
                shard: bool) -> DataLoader:
        transforms = {name: view_transform(self.cfg, kind) for name, kind in augment.views.items()}
        ds = ViewsDataset(augment.dataset, transforms, augment.neighbors, partner=PARTNER)
        return worker_loader(ds, self.cfg, self.device, batch_size, shuffle=shuffle, train=train,
                             shard=shard)


def worker_loader(ds: Dataset, cfg: Config, device: torch.device, batch_size: int, *,
                  shuffle: bool, train: bool, shard: bool,
                  collate: Callable | None = None) -> DataLoader:
    """A persistent DataLoader over ``ds`` whose items are asked for as ``(index, seed)``: for
    training a ``DistributedSampler`` (one process: all samples) with this process's share of
    the global batch size, for inference with ``shard`` this process's ``shard_indices``."""
    batch_size, _ = num_batches(len(ds), batch_size, train)
    if shard and not train:
        indices = distributed.shard_indices(len(ds)).tolist()
    else:
        # Training: every process gets len(ds) // W samples of the epoch's permutation, and
        # its k-th batch of batch_size / W holds its share of the k-th global batch.
        replicas, rank = (distributed.world_size(), distributed.rank()) if train else (1, 0)
        indices = DistributedSampler(ds, replicas, rank, shuffle=shuffle, drop_last=train)
        batch_size //= replicas
    return make_loader(ds, batch_size, SeededSampler(indices), num_workers=cfg.data.num_workers,
                       pin_memory=device.type == "cuda", drop_last=train, collate=collate)


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


def index_order(n: int, shuffle: bool, seed: int, device: torch.device) -> torch.Tensor:
    """An epoch's sample order: a permutation drawn on the host from ``seed`` (the same on every
    device and in every process), or 0..n-1."""
    if not shuffle:
        return torch.arange(n, device=device)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)


def index_batches(n: int, batch_size: int, *, shuffle: bool, seed: int, train: bool,
                  shard: bool, device: torch.device) -> Batches:
    """An epoch's batches of sample indices: in training this process's share of each global
    batch of the epoch's order; with ``shard`` (inference) batches of this process's shard, in
    data-set order, for ``distributed.gather_rows``."""
    if not train and shard:
        order = distributed.shard_indices(n).to(device)
        count = -(-len(order) // batch_size)
        return Batches(({"index": order[b * batch_size:(b + 1) * batch_size]}
                        for b in range(count)), count)
    batch_size, count = num_batches(n, batch_size, train)
    order = index_order(n, shuffle, seed, device)
    share = distributed.local_batch if train else (lambda batch: batch)
    return Batches(({"index": share(order[b * batch_size:(b + 1) * batch_size])}
                    for b in range(count)), count)


def fits_on_device(cfg: Config, dataset: ImageDataset) -> bool:
    """Whether ``auto`` should hold this data set on the device: its uint8 images at the stored
    size (``data.resize`` or ``data.image_size``) take at most ``perf.device_data_gb``."""
    size = cfg.data.resize or cfg.data.image_size
    return len(dataset) * 3 * size * size <= cfg.perf.device_data_gb * 1e9


def data_path_for(cfg: Config, device: torch.device, dataset: ImageDataset) -> DataPath:
    choice = cfg.perf.data_path
    if choice == "auto":
        choice = "device" if fits_on_device(cfg, dataset) else "workers"
    if choice == "decode":
        from scanclust.data.decode import DecodePath  # it builds on this module's paths

        return DecodePath(cfg, device)
    return DevicePath(cfg, device) if choice == "device" else WorkerPath(cfg, device)
