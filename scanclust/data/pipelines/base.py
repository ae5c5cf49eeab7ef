"""What every data path shares: batches, the views interface, epoch orders of indices."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from scanclust import distributed
from scanclust.config import Config
from scanclust.data.datasets import ImageDataset
from scanclust.runtime import process_seed

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
            value = layout(value.to(device, non_blocking=True), channels_last and value.dim() == 4)
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
        count, share = -(-len(order) // batch_size), (lambda batch: batch)
    else:
        batch_size, count = num_batches(n, batch_size, train)
        order = index_order(n, shuffle, seed, device)
        share = distributed.local_batch if train else (lambda batch: batch)
    return Batches(({"index": share(order[b * batch_size:(b + 1) * batch_size])}
                    for b in range(count)), count)


def num_batches(n: int, batch_size: int, train: bool) -> tuple[int, int]:
    """(batch size, batch count) with the same rule on both paths: training drops the last
    partial batch unless the data set is smaller than one batch."""
    batch_size = min(batch_size, n)
    drop_last = train and n > batch_size
    return batch_size, (n // batch_size if drop_last else math.ceil(n / batch_size))

