"""The worker data path: per-sample transforms in DataLoader workers, batches as dicts.

A batch is a dict of tensors: the named views (``view1``/``view2`` for the pretext,
``anchor``/``neighbor`` for SCAN, ``weak``/``strong`` for self-label, ``image`` for features),
plus ``index`` and ``label`` (and ``neighbor_index`` for pairs); the device path's views have
the same names and meaning (``paths.py``).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from scanclust.data.datasets import ImageDataset


class ViewsDataset(Dataset):
    """Several named transforms of the same image, e.g. two SimCLR views or weak + strong.

    With ``neighbors`` [N, K] the view named ``partner`` shows one of the sample's K mined
    neighbours, drawn uniformly afresh at every access (the sample itself under another
    augmentation when K = 0, the paper's K = 0 ablation); the others show the sample.
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

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        image = self.base.load(index)
        item: dict[str, torch.Tensor | int] = {"index": index,
                                               "label": int(self.base.targets[index])}
        other = None
        if self.neighbors is not None:
            k = self.neighbors.shape[1]
            other = index if k == 0 else int(self.neighbors[index, torch.randint(k, ()).item()])
            item["neighbor_index"] = other
        for name, transform in self.views.items():
            if name == self.partner and other is not None:
                item[name] = transform(image if other == index else self.base.load(other))
            else:
                item[name] = transform(image)
        return item


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

