"""Data: data sets behind one interface, per-sample transforms, and the loaders that batch them.

Names are imported on first use, so ``scanclust.data.images`` (reading files, no torch) can be
used by the command line and by decoding workers without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"UNLABELED": "scanclust.data.datasets", "DatasetError": "scanclust.data.datasets",
            "ImageDataset": "scanclust.data.datasets", "build_dataset": "scanclust.data.sources",
            "view_transform": "scanclust.data.transforms"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'scanclust.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
