"""One dataset interface for every image source: ``ds[i] -> (image, index, label)``; the
sources themselves are built in ``sources.py``.

Every stage after this one sees the same small interface, so CIFAR arrays, ImageNet folders and
a user's photo folder are interchangeable. The index travels with the image because mining and
SCAN look up neighbours by position; the label is -1 (``UNLABELED``) where a source has none, so
that evaluation can skip it instead of every caller special-casing unlabeled data.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from scanclust.data.images import ImageReadError, escape_name, open_image
from scanclust.errors import UserError

UNLABELED = -1


class DatasetError(UserError, ValueError):
    """A data problem; the one-line message names the file, folder or setting at fault."""


class ImageDataset(Dataset):
    """Base class: subclasses supply ``load(i)`` and ``describe(i)``; labels live in ``targets``."""

    def __init__(self, name: str, targets: np.ndarray, classes: list[str] | None,
                 transform: Callable | None = None) -> None:
        self.name = name
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = classes
        self.transform = transform

    @property
    def has_labels(self) -> bool:
        return bool((self.targets >= 0).any())

    @property
    def num_classes(self) -> int | None:
        """The named classes, else one more than the largest label; None without labels."""
        if self.classes is not None:
            return len(self.classes)
        return int(self.targets.max()) + 1 if self.has_labels else None

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        raise NotImplementedError

    def as_uint8(self, size: int | None = None, progress: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def subset(self, indices: np.ndarray) -> ImageDataset:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[object, int, int]:
        image = self.load(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, i, int(self.targets[i])


class ArrayDataset(ImageDataset):
    """Images held in memory as a uint8 array [N, H, W, 3] (CIFAR, STL-10, digits).

    The array may be a strided view (STL-10 is stored channels-first); it is not copied.
    """

    def __init__(self, name: str, images: np.ndarray, targets: np.ndarray,
                 classes: list[str] | None, transform: Callable | None = None) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise DatasetError(f"{name}: expected uint8 images [N, H, W, 3], got "
                               f"{images.dtype} {list(images.shape)}")
        if len(images) != len(targets):
            raise DatasetError(f"{name}: {len(images)} images but {len(targets)} labels")
        super().__init__(name, targets, classes, transform)
        self.images = images

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    def describe(self, i: int) -> str:
        return f"{self.name}#{i}"

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.name, self.images[indices], self.targets[indices], self.classes,
                            self.transform)

    def as_uint8(self, size: int | None = None, progress: bool = True) -> torch.Tensor:
        """The whole array as [N, 3, H, W]; resized on tensors, in chunks, only if ``size`` asks."""
        images = torch.from_numpy(self.images).permute(0, 3, 1, 2)
        h, w = images.shape[2:]
        if size is None or (h == w == size):
            return images.contiguous()
        out = torch.empty(len(images), 3, size, size, dtype=torch.uint8)
        chunk = 1024  # bounds the float buffer that antialiased resizing needs
        for start in tqdm(range(0, len(images), chunk), desc=f"resizing {self.name}",
                          disable=not progress):
            block = TF.resize(images[start:start + chunk], [size], antialias=True)
            out[start:start + chunk] = TF.center_crop(block, [size, size])
        return out


class FileDataset(ImageDataset):
    """Images decoded from files on every access (image folders, ImageNet)."""

    def __init__(self, name: str, paths: list[Path], targets: np.ndarray,
                 classes: list[str] | None, transform: Callable | None = None) -> None:
        if len(paths) != len(targets):
            raise DatasetError(f"{name}: {len(paths)} files but {len(targets)} labels")
        super().__init__(name, targets, classes, transform)
        self.paths = [Path(p) for p in paths]

    def load(self, i: int) -> Image.Image:
        return _open_rgb(self.paths[i])

    def describe(self, i: int) -> str:
        return str(self.paths[i])

    def subset(self, indices: np.ndarray) -> FileDataset:
        return FileDataset(self.name, [self.paths[i] for i in indices], self.targets[indices],
                           self.classes, self.transform)

    def as_uint8(self, size: int | None = None, progress: bool = True) -> torch.Tensor:
        """Decode every file into one [N, 3, H, W] tensor, on all CPU cores.

        Without ``size`` all images must share one shape, since silently resizing would change
        what the model sees; with ``size`` the shorter side is resized to it, then center-cropped.
        The result is remembered for the process (the most recent two), so the stages of one
        run decode a folder once, not once per stage.
        """
        return _decode_all(tuple(self.paths), size, self.name, progress)


class FolderDataset(ArrayDataset):
    """A user's folder, decoded once into a uint8 array (see ``data/cache.py``).

    ``paths`` are the readable images, in the order of the array; ``skipped`` lists every file
    that was found but cannot be used, with the reason, for the run's ``skipped.txt``.
    """

    def __init__(self, name: str, images: np.ndarray, paths: list[Path], root: Path,
                 targets: np.ndarray, classes: list[str] | None,
                 skipped: list[tuple[Path, str]], transform: Callable | None = None) -> None:
        super().__init__(name, images, targets, classes, transform)
        if len(paths) != len(images):
            raise DatasetError(f"{name}: {len(paths)} files but {len(images)} decoded images")
        self.paths = [Path(p) for p in paths]
        self.root = Path(root)
        self.skipped = skipped

    def describe(self, i: int) -> str:
        return str(self.paths[i])

    def relative(self, i: int) -> str:
        """The path of image ``i`` relative to the folder, with forward slashes."""
        return self.paths[i].relative_to(self.root).as_posix()

    def subset(self, indices: np.ndarray) -> FolderDataset:
        return FolderDataset(self.name, self.images[indices], [self.paths[i] for i in indices],
                             self.root, self.targets[indices], self.classes, self.skipped,
                             self.transform)


def _open_rgb(path: Path, size: int | None = None) -> Image.Image:
    try:
        return open_image(path, size)
    except ImageReadError as err:
        raise DatasetError(f"cannot read image {escape_name(path)}: {err}") from None


def _decode_one(path: Path, size: int | None) -> np.ndarray:
    image = _open_rgb(path, size)
    if size is not None:
        image = TF.center_crop(TF.resize(image, [size]), [size, size])
    return np.array(image)  # writable: torch.from_numpy warns on read-only arrays


@functools.lru_cache(maxsize=2)
def _decode_all(paths: tuple[Path, ...], size: int | None, name: str,
                progress: bool) -> torch.Tensor:
    if not paths:
        raise DatasetError(f"{name}: no images to convert")
    first = _decode_one(paths[0], size)
    out = torch.empty(len(paths), 3, *first.shape[:2], dtype=torch.uint8)
    # PIL releases the GIL while decoding, so threads use every core without pickling images
    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        decoded = pool.map(lambda p: _decode_one(p, size), paths, chunksize=256)
        for i, array in enumerate(tqdm(decoded, total=len(paths), desc=f"decoding {name}",
                                       disable=None if progress else True)):
            if array.shape != first.shape:
                raise DatasetError(
                    f"image {paths[i]} is {array.shape[1]}x{array.shape[0]} but {paths[0]} is "
                    f"{first.shape[1]}x{first.shape[0]}; pass a size to resize them to one shape")
            out[i] = torch.from_numpy(array).permute(2, 0, 1)
    return out
