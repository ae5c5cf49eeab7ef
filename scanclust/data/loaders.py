"""The worker data path: per-sample transforms in DataLoader workers, batches as dicts.

Every stage consumes an iterable of dicts of tensors (``view1``/``view2`` for the pretext,
``anchor``/``neighbor`` for SCAN, ``weak``/``strong`` for self-label, ``image`` for features,
plus ``index`` and ``label``). Any other data path (images held on the GPU, say) only has to
yield the same dicts for the training loops to run unchanged.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from scanclust.data.datasets import ImageDataset


class ViewsDataset(Dataset):
    """Several named transforms of the same image, e.g. two SimCLR views or weak + strong."""

    def __init__(self, base: ImageDataset, views: dict[str, Callable]) -> None:
        self.base = base
        self.views = views

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        image = self.base.load(index)
        item: dict[str, torch.Tensor | int] = {name: t(image) for name, t in self.views.items()}
        item["index"] = index
        item["label"] = int(self.base.targets[index])
        return item


class NeighborsDataset(Dataset):
    """An anchor and one of its mined neighbours, drawn uniformly afresh at every access.

    ``neighbors`` has shape [N, K]; with K = 0 columns the "neighbour" is the anchor itself
    under another random augmentation (the paper's K = 0 ablation).
    """

    def __init__(self, base: ImageDataset, neighbors: np.ndarray,
                 anchor_transform: Callable, neighbor_transform: Callable) -> None:
        if len(neighbors) != len(base):
            raise ValueError(f"{len(neighbors)} neighbour rows for {len(base)} images")
        self.base = base
        self.neighbors = neighbors
        self.anchor_transform = anchor_transform
        self.neighbor_transform = neighbor_transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        k = self.neighbors.shape[1]
        other = index if k == 0 else int(self.neighbors[index, torch.randint(k, ()).item()])
        return {"anchor": self.anchor_transform(self.base.load(index)),
                "neighbor": self.neighbor_transform(self.base.load(other)),
                "index": index, "neighbor_index": other,
                "label": int(self.base.targets[index])}


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int,
                num_workers: int, pin_memory: bool = False, train: bool = True) -> DataLoader:
    """A DataLoader whose order and worker seeds follow ``seed`` alone.

    Training loaders drop the last partial batch (a batch of 3 would make the entropy term of
    the SCAN loss and batch norm statistics meaningless) unless the data set is smaller than a
    batch, in which case the whole set is one batch.
    """
    batch_size, _ = num_batches(len(dataset), batch_size, train)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, pin_memory=pin_memory,
                      drop_last=train and len(dataset) > batch_size,
                      persistent_workers=False)


def num_batches(n: int, batch_size: int, train: bool) -> tuple[int, int]:
    """(batch size, batch count) with the same rule on both paths: training drops the last
    partial batch unless the data set is smaller than one batch."""
    batch_size = min(batch_size, n)
    drop_last = train and n > batch_size
    return batch_size, (n // batch_size if drop_last else math.ceil(n / batch_size))

