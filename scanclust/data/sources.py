"""Where a run's images come from: the torchvision sets (CIFAR-10, CIFAR-100-20, STL-10),
ImageNet and its subsets, a user's folder, and scikit-learn's digits, each behind the one
interface of ``datasets.py``; ``build_dataset`` picks the one ``data.dataset`` names.
"""

from __future__ import annotations

import logging
import pickle
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from scanclust.config import DataConfig
from scanclust.data.cache import decoded_images
from scanclust.data.datasets import (UNLABELED, ArrayDataset, DatasetError, FileDataset,
                                     FolderDataset, ImageDataset)
from scanclust.data.images import (READABLE_EXTENSIONS, ImageReadError, Listing, escape_name,
                                   list_images)

SPLITS = ("train", "val", "pretext")
log = logging.getLogger("scanclust")
IMAGENET_SUBSETS = ("imagenet_50", "imagenet_100", "imagenet_200")


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
    builders = {"cifar10": _cifar10, "cifar20": _cifar20, "stl10": _stl10, "folder": _folder,
                "digits": _digits, **dict.fromkeys(("imagenet", *IMAGENET_SUBSETS), _imagenet)}
    if cfg.dataset not in builders:
        raise DatasetError(f"data.dataset={cfg.dataset!r} is not a known data set "
                           f"(cifar10, cifar20, stl10, imagenet, {', '.join(IMAGENET_SUBSETS)}, "
                           f"folder, digits)")
    return builders[cfg.dataset](cfg, split)


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
        wnids = classes = sorted(d.name for d in (root / "train").iterdir()
                                 if d.is_dir() and not d.name.startswith("."))
    else:
        wnids, classes = _subset_classes(cfg.dataset)
    _require_dir(base, root)
    paths: list[Path] = []
    targets: list[int] = []
    for label, wnid in enumerate(wnids):
        folder = base / wnid
        if not folder.is_dir():
            raise DatasetError(f"ImageNet class folder {wnid} of {cfg.dataset} missing under {base}")
        images = list_images(folder).paths
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
                           f"{', '.join(READABLE_EXTENSIONS)} in it and its subfolders){found}")
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
