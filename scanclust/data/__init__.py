"""Data: data sets behind one interface, per-sample transforms, and the loaders that batch them."""

from __future__ import annotations

from scanclust.data.datasets import UNLABELED, DatasetError, ImageDataset, build_dataset
from scanclust.data.transforms import view_transform

__all__ = ["UNLABELED", "DatasetError", "ImageDataset", "build_dataset", "view_transform"]
