"""Data: data sets behind one interface, per-sample transforms, and the loaders that batch them."""

from __future__ import annotations

from typing import Callable

from scanclust.config import Config
from scanclust.data.datasets import UNLABELED, DatasetError, ImageDataset, build_dataset
from scanclust.data.transforms import eval_transform, simclr_transform, strong_transform


def view_transform(cfg: Config, kind: str) -> Callable:
    """The per-sample transform for a view kind: ``simclr``, ``strong`` or ``eval``."""
    d = cfg.data
    if kind == "simclr":
        return simclr_transform(cfg.augment.simclr, d.image_size, d.mean, d.std)
    if kind == "strong":
        return strong_transform(cfg.augment.strong, d.image_size, d.mean, d.std, d.resize)
    if kind == "eval":
        return eval_transform(d.image_size, d.mean, d.std, d.resize)
    raise ValueError(f"unknown view kind {kind!r}")


__all__ = ["UNLABELED", "DatasetError", "ImageDataset", "build_dataset", "view_transform"]
