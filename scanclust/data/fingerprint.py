"""What a stage read: a fingerprint of the image files behind a file-backed data set.

The lineage of a stage that read a folder (``data.dataset=folder``: ``data.root`` and
``data.val_root``; ImageNet: the train and val folders) records the sorted relative paths of its
image files with each file's size and modification time, hashed: the facts the decode cache
(``cache.py``) keys on. A table of the same facts, one row per file, lets a refusal say how many
files changed, appeared or went. Nothing is decoded: a folder costs the listing the data set
makes anyway and one ``os.stat`` per file.

The torchvision sets have none: torchvision checks their files by checksum, and the digits ship
with scikit-learn.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scanclust.config import DataConfig

IMAGENET = ("imagenet", "imagenet_50", "imagenet_100", "imagenet_200")


@dataclass(frozen=True)
class Fingerprint:
    """One folder's image files: their hash, and per file ``[path hash, size, mtime_ns]``."""

    folder: Path
    sha256: str
    table: np.ndarray  # int64 [N, 3], in the listing's order

    def record(self) -> dict[str, object]:
        return {"folder": str(self.folder), "files": len(self.table), "sha256": self.sha256}


def sources(data: DataConfig, split: str) -> dict[str, Path]:
    """The folders a split reads, by lineage key: ``data.root`` (``data.val_root`` for the val
    split when set) of a folder data set, ``data.root/train`` or ``data.root/val`` of ImageNet;
    nothing for the other data sets."""
    if data.dataset == "folder":
        if split == "val" and data.val_root is not None:
            return {"data.val_root": Path(data.val_root)}
        return {"data.root": Path(data.root)}
    if data.dataset in IMAGENET:
        sub = "val" if split == "val" else "train"
        return {f"data.root/{sub}": Path(data.root) / sub}
    return {}


def fingerprint(data: DataConfig, key: str) -> Fingerprint:
    """The fingerprint of the files the data set reads for ``key`` (see ``sources``), from the
    data set's own listing, so a folder it refuses is refused here, before any work."""
    from scanclust.data.sources import imagenet_files, list_folder

    if data.dataset == "folder":
        listing = list_folder(Path(data.val_root if key == "data.val_root" else data.root), key)
        return _fingerprint(listing.root, listing.paths)
    sub = key.rpartition("/")[2]
    return _fingerprint(Path(data.root) / sub, imagenet_files(data, sub)[0])


def _fingerprint(base: Path, paths: list[Path]) -> Fingerprint:
    prefix = os.path.join(str(base), "")
    digest = hashlib.sha256()
    table = np.zeros((len(paths), 3), dtype=np.int64)
    for row, path in enumerate(paths):
        name = str(path)
        # the listing joins names onto the folder, so slicing is relative_to without its cost
        rel = name[len(prefix):] if name.startswith(prefix) else path.relative_to(base).as_posix()
        try:
            stat = os.stat(name)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:  # gone since it was listed
            size, mtime = -1, -1
        encoded = rel.replace(os.sep, "/").encode("utf-8", "surrogateescape")
        digest.update(b"%s\0%d\0%d\n" % (encoded, size, mtime))
        table[row] = (int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "little",
                                     signed=True), size, mtime)
    return Fingerprint(base.resolve(), digest.hexdigest(), table)


def difference(before: np.ndarray, after: np.ndarray) -> tuple[int, int, int]:
    """``(changed, added, removed)`` files between two fingerprint tables."""
    common, old, new = np.intersect1d(before[:, 0], after[:, 0], assume_unique=True,
                                      return_indices=True)
    changed = int((before[old, 1:] != after[new, 1:]).any(axis=1).sum())
    return changed, len(after) - len(common), len(before) - len(common)
