"""One dataset interface for every image source: ``ds[i] -> (image, index, label)``.

Every stage after this one sees the same small interface, so CIFAR arrays, ImageNet folders and
a user's photo folder are interchangeable. The index travels with the image because mining and
SCAN look up neighbours by position; the label is -1 (``UNLABELED``) where a source has none, so
that evaluation can skip it instead of every caller special-casing unlabeled data.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from scanclust.config import DataConfig
from scanclust.data.cache import decoded_images
from scanclust.data.images import (READABLE_EXTENSIONS, ImageReadError, Listing, escape_name,
                                   list_images, open_image)
from scanclust.errors import UserError

UNLABELED = -1
SPLITS = ("train", "val", "pretext")
IMAGE_EXTENSIONS = READABLE_EXTENSIONS
log = logging.getLogger("scanclust")
IMAGENET_SUBSETS = ("imagenet_50", "imagenet_100", "imagenet_200")


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


def build_dataset(cfg: DataConfig, split: str) -> ImageDataset:
    """The ``split`` ("train", "val" or "pretext") of the data set that ``cfg`` names.

    "val" is the held-out split the paper reports on; "pretext" is the train split, except for
    STL-10, whose 100k unlabeled images join the 5k train images for representation learning.
    """
    if split not in SPLITS:
        raise DatasetError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    dataset = _build(cfg, split)
    keep = even_subset(len(dataset), cfg.max_images)
    return dataset if keep is None else dataset.subset(keep)


def even_subset(n: int, limit: int | None) -> np.ndarray | None:
    """``data.max_images``: indices of ``limit`` of ``n`` samples, evenly spaced rather than
    the first ones (sorted sources such as folders keep every class); None to keep all."""
    if limit is None or n <= limit:
        return None
    return np.linspace(0, n - 1, limit).round().astype(np.int64)


def _build(cfg: DataConfig, split: str) -> ImageDataset:
    name = cfg.dataset
    if name == "cifar10":
        return _cifar10(cfg, split)
    if name == "cifar20":
        return _cifar20(cfg, split)
    if name == "stl10":
        return _stl10(cfg, split)
    if name == "imagenet" or name in IMAGENET_SUBSETS:
        return _imagenet(cfg, split)
    if name == "folder":
        return _folder(cfg, split)
    if name == "digits":
        return _digits(cfg, split)
    raise DatasetError(f"data.dataset={name!r} is not a known data set "
                       f"(cifar10, cifar20, stl10, imagenet, {', '.join(IMAGENET_SUBSETS)}, "
                       f"folder, digits)")


def _torchvision(make: Callable, cfg: DataConfig, title: str, folder: str) -> Any:
    """Call a torchvision constructor, turning its missing-data and download errors into ours."""
    root = Path(cfg.root)
    try:
        return make()
    except RuntimeError as err:
        if "not found or corrupted" not in str(err):
            raise
        if (root / folder).exists():
            raise DatasetError(f"data.root={root} has {folder} but its files are missing or fail "
                               f"torchvision's checksum; delete it and set data.download=true, "
                               f"or point data.root at a good copy of {title}") from None
        raise DatasetError(f"data.root={root} does not contain {title} (no {folder}); set "
                           f"data.download=true or point data.root at it") from None
    except OSError as err:  # URLError and socket errors are OSErrors
        raise DatasetError(f"could not download {title} into data.root={root}: {err}; place "
                           f"{folder} there by hand or retry with a network") from None


def _cifar10(cfg: DataConfig, split: str) -> ArrayDataset:
    from torchvision.datasets import CIFAR10

    train = split != "val"
    ds = _torchvision(lambda: CIFAR10(cfg.root, train=train, download=cfg.download), cfg,
                      "CIFAR-10", "cifar-10-batches-py")
    return ArrayDataset(f"cifar10/{split}", ds.data, np.array(ds.targets), list(ds.classes))


def cifar100_coarse_labels(folder: Path, train: bool) -> tuple[np.ndarray, list[str]]:
    """The 20 superclass labels and names of CIFAR-100 from its official pickles in ``folder``.

    torchvision only exposes the 100 fine labels; SCAN's CIFAR-100-20 uses the coarse ones that
    the same files carry.
    """
    folder = Path(folder)
    data_file, meta_file = folder / ("train" if train else "test"), folder / "meta"
    try:
        with open(data_file, "rb") as f:
            labels = np.array(pickle.load(f, encoding="latin1")["coarse_labels"], dtype=np.int64)
        with open(meta_file, "rb") as f:
            names = list(pickle.load(f, encoding="latin1")["coarse_label_names"])
    except (OSError, KeyError, pickle.UnpicklingError) as err:
        raise DatasetError(f"cannot read CIFAR-100 coarse labels from {folder}: {err!r}") from None
    return labels, names


def _cifar20(cfg: DataConfig, split: str) -> ArrayDataset:
    from torchvision.datasets import CIFAR100

    train = split != "val"
    ds = _torchvision(lambda: CIFAR100(cfg.root, train=train, download=cfg.download), cfg,
                      "CIFAR-100", "cifar-100-python")
    labels, names = cifar100_coarse_labels(Path(cfg.root) / "cifar-100-python", train)
    return ArrayDataset(f"cifar20/{split}", ds.data, labels, names)


def _stl10(cfg: DataConfig, split: str) -> ArrayDataset:
    from torchvision.datasets import STL10

    tv_split = {"train": "train", "val": "test", "pretext": "train+unlabeled"}[split]
    ds = _torchvision(lambda: STL10(cfg.root, split=tv_split, download=cfg.download), cfg,
                      "STL-10", "stl10_binary")
    # torchvision labels the unlabeled part -1, which is UNLABELED
    classes = getattr(ds, "classes", None)  # read from class_names.txt when the archive has it
    return ArrayDataset(f"stl10/{split}", ds.data.transpose(0, 2, 3, 1), ds.labels,
                        list(classes) if classes is not None else None)


def _images_under(folder: Path) -> list[Path]:
    """All readable image files below ``folder``, sorted (see ``images.list_images``)."""
    return list_images(folder).paths


def _imagenet(cfg: DataConfig, split: str) -> FileDataset:
    """ImageNet or a subset in ImageFolder layout: ``root/{train,val}/<wnid>/*.JPEG``.

    The official val images come in one flat folder; they must be sorted into wnid folders
    first (the usual ``valprep.sh``), as most users already have them. Full ImageNet labels
    follow the sorted wnids of ``train/``; a subset keeps the order of its class list.
    """
    paths, targets, classes = imagenet_files(cfg, split)
    return FileDataset(f"{cfg.dataset}/{split}", paths, np.array(targets), classes)


def imagenet_files(cfg: DataConfig, split: str) -> tuple[list[Path], list[int], list[str]]:
    """The image files of an ImageNet split, their labels and the class names (a listing,
    nothing decoded: the run directory fingerprints the same files)."""
    root = Path(cfg.root)
    base = root / ("val" if split == "val" else "train")
    if cfg.dataset == "imagenet":
        _require_dir(root / "train", root)  # the train folders define the 1000 labels
        wnids = sorted(d.name for d in (root / "train").iterdir()
                       if d.is_dir() and not d.name.startswith("."))
        classes = wnids
    else:
        wnids, classes = _subset_classes(cfg.dataset)
    _require_dir(base, root)
    paths: list[Path] = []
    targets: list[int] = []
    for label, wnid in enumerate(wnids):
        folder = base / wnid
        if not folder.is_dir():
            raise DatasetError(f"ImageNet class folder {wnid} of {cfg.dataset} missing under {base}")
        images = _images_under(folder)
        if not images:
            raise DatasetError(f"ImageNet class folder {folder} of {cfg.dataset} contains no images")
        paths += images
        targets += [label] * len(images)
    if not paths:
        raise DatasetError(f"data.root={root}: {base} contains no class folders")
    return paths, targets, classes


def _require_dir(folder: Path, root: Path) -> None:
    if not folder.is_dir():
        raise DatasetError(f"data.root={root} has no {folder.name} folder; expected ImageNet as "
                           f"train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")


def _subset_classes(name: str) -> tuple[list[str], list[str]]:
    """The wnids and names of a shipped ImageNet subset list (lines "wnid Name With Spaces")."""
    text = (resources.files("scanclust.data") / "imagenet_subsets" / f"{name}.txt").read_text()
    rows = [line.split(maxsplit=1) for line in text.splitlines() if line.strip()]
    return [r[0] for r in rows], [r[1] if len(r) > 1 else r[0] for r in rows]


def list_folder(folder: Path, key: str) -> Listing:
    """The images below the folder that setting ``key`` names; a one-line error naming the
    setting where there are none (the run directory fingerprints the same listing)."""
    if not folder.exists():
        raise DatasetError(f"{key}={folder} does not exist")
    if not folder.is_dir():
        raise DatasetError(f"{key}={folder} is not a folder")
    try:
        listing = list_images(folder)
    except ImageReadError as err:
        raise DatasetError(f"{key}={folder}: {err}") from None
    if not listing.paths:
        found = f"; {len(listing.skipped)} files could not be used (first: " \
                f"{escape_name(listing.skipped[0][0])}: {listing.skipped[0][1]})" \
            if listing.skipped else ""
        raise DatasetError(f"{key}={folder} contains no images (looked for "
                           f"{', '.join(IMAGE_EXTENSIONS)} in it and its subfolders){found}")
    return listing


def _scan_folder(folder: Path, key: str, labels_from_folders: bool
                 ) -> tuple[Listing, list[str] | None, list[int]]:
    """The listing, class names and per-image class positions of a user's folder.

    With ``labels_from_folders`` a folder whose subfolders hold images is a labelled tree (one
    class per immediate subfolder, sorted by name, images anywhere below it); a flat folder is
    unlabelled either way. Without it every image below the folder is one unlabelled pool.
    """
    listing = list_folder(folder, key)
    parts = [path.relative_to(folder).parts for path in listing.paths]
    nested = [p for p in parts if len(p) > 1]
    if not labels_from_folders or not nested:
        return listing, None, [UNLABELED] * len(listing.paths)
    loose = [path for path, p in zip(listing.paths, parts) if len(p) == 1]
    if loose:
        # in a class tree a top-level image has no class; dropping it silently would hide data
        raise DatasetError(f"{key}={folder} has class folders but also {len(loose)} images "
                           f"outside them (e.g. {escape_name(loose[0])}); move them into a class "
                           f"folder")
    classes = sorted({p[0] for p in parts})
    position = {name: k for k, name in enumerate(classes)}
    return listing, classes, [position[p[0]] for p in parts]


def _folder(cfg: DataConfig, split: str) -> FolderDataset:
    """A user's folder: ``data.root`` is train (and pretext); ``data.val_root`` or, without it,
    the same images again are val, because practitioners usually cluster their whole folder."""
    listing, classes, labels = _scan_folder(Path(cfg.root), "data.root", cfg.labels_from_folders)
    key = "data.root"
    if split == "val" and cfg.val_root is not None:
        val_listing, val_classes, val_labels = _scan_folder(Path(cfg.val_root), "data.val_root",
                                                            cfg.labels_from_folders)
        if classes is not None and val_classes is not None:
            unknown = [c for c in val_classes if c not in classes]
            if unknown:
                raise DatasetError(f"data.val_root={cfg.val_root} has class folder {unknown[0]!r} "
                                   f"that data.root={cfg.root} lacks")
            position = {name: k for k, name in enumerate(classes)}
            val_labels = [position[val_classes[c]] for c in val_labels]
        listing, classes, labels, key = val_listing, classes or val_classes, val_labels, \
            "data.val_root"
    paths = listing.paths
    targets = np.array(labels, dtype=np.int64)
    keep = even_subset(len(paths), cfg.max_images)
    if keep is not None:  # before decoding: a smoke test decodes only what it uses
        paths, targets = [paths[i] for i in keep], targets[keep]
    size = cfg.resize or cfg.image_size
    images, failures = decoded_images(paths, size, cfg.cache_dir, desc=f"decoding {key}")
    skipped = listing.skipped + [(paths[i], reason) for i, reason in sorted(failures.items())]
    if skipped and cfg.strict:
        path, reason = skipped[0]
        raise DatasetError(f"cannot read image {escape_name(path)}: {reason} (data.strict=true; "
                           f"{len(skipped)} unreadable files in all)")
    if failures:
        _warn_skipped(key, [(paths[i], r) for i, r in sorted(failures.items())], len(skipped))
        keep = np.array([i for i in range(len(paths)) if i not in failures], dtype=np.int64)
        paths, targets = [paths[i] for i in keep], targets[keep]
    if not paths:
        raise DatasetError(f"{key}={listing.root}: none of its {len(listing.paths)} image files "
                           f"could be read (first: {escape_name(skipped[0][0])}: {skipped[0][1]})")
    return FolderDataset(f"folder/{split}", images, paths, listing.root, targets, classes,
                         skipped)


_WARNED: set[tuple[str, int]] = set()  # (folder, count): warn once per process, not per stage


def _warn_skipped(key: str, failures: list[tuple[Path, str]], total: int) -> None:
    """One warning per unreadable file (the first 10), once per process and folder."""
    marker = (str(failures[0][0].parent), len(failures))
    if marker in _WARNED:
        return
    _WARNED.add(marker)
    for path, reason in failures[:10]:
        log.warning("skipped %s: %s", escape_name(path), reason)
    if len(failures) > 10:
        log.warning("... and %d more unreadable files", len(failures) - 10)
    log.warning("%s: %d files skipped in all (data.strict=true stops instead)", key, total)


def _digits(cfg: DataConfig, split: str) -> ArrayDataset:
    """scikit-learn's bundled 8x8 digits, upsampled to RGB: a labelled set that needs no download.

    The 80/20 split is stratified and seeded so that every run and test sees the same images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    size = cfg.image_size
    gray = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                     for im in small])
    images = np.repeat(gray[..., None], 3, axis=3)
    train_idx, val_idx = train_test_split(np.arange(len(images)), test_size=0.2, random_state=0,
                                          stratify=digits.target)
    idx = np.sort(val_idx if split == "val" else train_idx)
    return ArrayDataset(f"digits/{split}", images[idx], digits.target[idx],
                        [str(d) for d in range(10)])
