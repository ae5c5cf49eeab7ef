"""The worker path: per-sample torchvision transforms of PIL images in DataLoader workers.

A batch is a dict of tensors: the named views (``view1``/``view2`` for the pretext,
``anchor``/``neighbor`` for SCAN, ``weak``/``strong`` for self-label, ``image`` for features),
plus ``index`` and ``label`` (and ``neighbor_index`` for pairs); the other paths' views have
the same names and meaning.
"""

from __future__ import annotations

import os
import signal
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from scanclust import distributed
from scanclust.config import Config
from scanclust.data.datasets import ImageDataset
from scanclust.data.pipelines.base import (PARTNER, Augment, Batch, Batches, DataPath, num_batches,
                                           to_device)
from scanclust.data.transforms import view_transform
from scanclust.runtime import channels_last


class ToDevice(Augment):
    """The worker path's ``augment``: its views are made in the workers (``ViewsDataset``), so
    here they only reach the device, in the layout the model takes."""

    def __init__(self, dataset: ImageDataset, views: dict[str, str],
                 neighbors: np.ndarray | None, device: torch.device, channels_last: bool) -> None:
        self.dataset, self.views, self.neighbors = dataset, views, neighbors
        self.device, self.channels_last = device, channels_last
        self.loaders: dict[tuple, DataLoader] = {}  # kept for their persistent workers

    def __call__(self, batch: Batch) -> Batch:
        return to_device(batch, self.device, self.channels_last)


class WorkerPath(DataPath):
    """Per-sample transforms of PIL images in DataLoader workers."""

    name = "workers"

    def augment(self, dataset: ImageDataset, views: dict[str, str],
                neighbors: np.ndarray | None = None,
                generator: torch.Generator | None = None,
                training: bool = True) -> ToDevice:
        return ToDevice(dataset, views, neighbors, self.device,
                        channels_last(self.cfg, self.device, training))

    def batches(self, augment: Augment, batch_size: int, *, shuffle: bool, seed: int,
                train: bool, shard: bool = False) -> Batches:
        assert isinstance(augment, ToDevice)
        key = (batch_size, shuffle, train, shard)
        if key not in augment.loaders:
            views = {name: view_transform(self.cfg, kind) for name, kind in augment.views.items()}
            ds = ViewsDataset(augment.dataset, views, augment.neighbors, partner=PARTNER)
            augment.loaders[key] = worker_loader(ds, self.cfg, self.device, batch_size,
                                                 shuffle=shuffle, train=train, shard=shard)
        loader = augment.loaders[key]
        loader.sampler.set_seed(seed)
        return Batches(iter(loader), len(loader))


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


class ViewsDataset(Dataset):
    """Several named transforms of the same image, e.g. two SimCLR views or weak + strong.

    With ``neighbors`` [N, K] the view named ``partner`` shows one of the sample's K mined
    neighbours, drawn uniformly afresh at every access (the sample itself under another
    augmentation when K = 0, the paper's K = 0 ablation); the others show the sample.

    An item is asked for by index, or by ``(index, seed)`` (``SeededSampler``): then its random
    draws come from a generator seeded with ``seed`` alone, and the caller's random state is
    left as it was.
    """

    def __init__(self, base: ImageDataset, views: dict[str, Callable],
                 neighbors: np.ndarray | None = None, partner: str = "neighbor") -> None:
        if neighbors is not None and len(neighbors) != len(base):
            raise ValueError(f"{len(neighbors)} neighbour rows for {len(base)} images")
        self.base = base
        self.views = views
        self.neighbors = neighbors
        self.partner = partner

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        if isinstance(key, int):
            return self._item(key)
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self._item(index)

    def _item(self, index: int) -> dict[str, torch.Tensor | int]:
        image = self.base.load(index)
        item: dict[str, torch.Tensor | int] = {"index": index,
                                               "label": int(self.base.targets[index])}
        other = None
        if self.neighbors is not None:
            k = self.neighbors.shape[1]
            other = index if k == 0 else int(self.neighbors[index, torch.randint(k, ()).item()])
            item["neighbor_index"] = other
        for name, transform in self.views.items():
            partner = name == self.partner and other is not None and other != index
            item[name] = transform(self.base.load(other) if partner else image)
        return item


class SeededSampler(Sampler):
    """Sample indices paired with a seed of their own for the epoch: ``(index, seed)``.

    Seeding every sample from (epoch seed, index) makes a worker-path augmentation depend on the
    run's seed, the epoch and the image only: not on the number of workers or processes, nor on
    whether the run was resumed, and workers can persist between epochs. In a training loader
    ``indices`` is a ``DistributedSampler``, whose order ``set_seed`` reseeds too.
    """

    def __init__(self, indices: Iterable[int]) -> None:
        self.indices = indices
        self.seed = 0

    def set_seed(self, seed: int) -> None:
        self.seed = seed
        if isinstance(self.indices, DistributedSampler):
            self.indices.seed = seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = self.seed << 32  # seeds < 2^31, indices < 2^32: distinct within the epoch
        for index in self.indices:
            yield int(index), base + int(index)

    def __len__(self) -> int:
        return len(self.indices)  # type: ignore[arg-type]


def make_loader(dataset: Dataset, batch_size: int, sampler: SeededSampler, *, num_workers: int,
                pin_memory: bool = False, drop_last: bool = False,
                collate: Callable | None = None) -> DataLoader:
    """A DataLoader over ``sampler``, built once per data set and view set: its workers persist
    from epoch to epoch (``SeededSampler.set_seed`` starts the next), so a large data set does
    not pay for starting them (and copying the file list into each) every epoch."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=drop_last, collate_fn=collate,
                      persistent_workers=num_workers > 0, worker_init_fn=_exit_on_sigterm)


def _exit_on_sigterm(worker_id: int) -> None:
    """End a worker quietly (exit code 0) on SIGTERM from anyone.

    systemd, Slurm at the time limit and ``kill -TERM -PGID`` signal every process of the job.
    torch's own handler lets the signal kill a worker unless the parent sent it, and the
    parent's DataLoader then prints a traceback ('worker ... is killed by signal: Terminated')
    under the command line's one line.
    """
    signal.signal(signal.SIGTERM, _exit_quietly)


def _exit_quietly(signum: int, frame: object) -> None:
    os._exit(0)

