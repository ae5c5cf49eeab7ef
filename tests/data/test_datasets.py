"""Dataset loaders: real CIFAR-10 JPEGs as an image folder, error messages, digits, ImageNet subsets."""

from __future__ import annotations

import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from scanclust.config import DataConfig
from scanclust.data.datasets import UNLABELED, ArrayDataset, DatasetError, FolderDataset
from scanclust.data.sources import build_dataset, cifar100_coarse_labels

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
SUBSET_FILE = Path(__file__).parents[2] / "scanclust" / "data" / "imagenet_subsets" / "imagenet_50.txt"


def _cfg(**kwargs) -> DataConfig:
    return DataConfig(**{"download": False, **kwargs})


def _write_images(folder: Path, names: list[str], size: tuple[int, int] = (8, 6)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        Image.new("RGB", size, (k * 40 % 256, 10, 200)).save(folder / name)


def test_class_folder_of_real_images(cifar_jpeg: Path) -> None:
    ds = build_dataset(_cfg(dataset="folder", root=str(cifar_jpeg / "train")), "train")
    assert isinstance(ds, FolderDataset)
    assert len(ds) == 300 and ds.classes == CIFAR10_CLASSES and ds.num_classes == 10
    assert ds.has_labels and np.bincount(ds.targets).tolist() == [30] * 10
    image, index, label = ds[45]
    assert index == 45 and label == 1 and isinstance(label, int)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert ds.describe(45) == str(ds.paths[45])
    assert Path(ds.describe(45)).parent.name == "automobile"
    assert ds.paths == sorted(ds.paths)

    ds.transform = lambda im: torch.from_numpy(np.array(im))
    assert ds[0][0].shape == (32, 32, 3)


def test_val_root_matches_classes_by_name(cifar_jpeg: Path, tmp_path: Path) -> None:
    # a val folder that lacks some classes must still use the train numbering
    val = tmp_path / "val"
    for name in ("cat", "truck"):
        (val / name).mkdir(parents=True)
        for src in sorted((cifar_jpeg / "test" / name).iterdir())[:3]:
            (val / name / src.name).write_bytes(src.read_bytes())
    cfg = _cfg(dataset="folder", root=str(cifar_jpeg / "train"), val_root=str(val))
    ds = build_dataset(cfg, "val")
    assert len(ds) == 6 and ds.classes == CIFAR10_CLASSES
    assert ds.targets.tolist() == [3] * 3 + [9] * 3

    full = build_dataset(_cfg(dataset="folder", root=str(cifar_jpeg / "train"),
                              val_root=str(cifar_jpeg / "test")), "val")
    assert len(full) == 100 and np.bincount(full.targets).tolist() == [10] * 10

    (val / "unicorn").mkdir()
    _write_images(val / "unicorn", ["a.png"])
    with pytest.raises(DatasetError, match="unicorn"):
        build_dataset(cfg, "val")


def test_val_without_val_root_is_train(cifar_jpeg: Path) -> None:
    cfg = _cfg(dataset="folder", root=str(cifar_jpeg / "test"))
    train, val, pretext = (build_dataset(cfg, s) for s in ("train", "val", "pretext"))
    assert train.paths == val.paths == pretext.paths and len(train) == 100


def test_as_uint8_equals_pil_decode(cifar_jpeg: Path) -> None:
    ds = build_dataset(_cfg(dataset="folder", root=str(cifar_jpeg / "test")), "train")
    images = ds.as_uint8(progress=False)
    assert images.shape == (100, 3, 32, 32) and images.dtype == torch.uint8
    for i in (0, 57, 99):
        with Image.open(ds.paths[i]) as im:
            expected = np.array(im.convert("RGB"))
        assert torch.equal(images[i], torch.from_numpy(expected).permute(2, 0, 1))
    assert ds.as_uint8(size=16, progress=False).shape == (100, 3, 16, 16)


def test_mixed_sizes_become_squares_of_the_image_size(tmp_path: Path) -> None:
    _write_images(tmp_path, ["a.png"], size=(8, 6))
    _write_images(tmp_path, ["b.png"], size=(5, 9))
    # shorter side to 4, then a centred 4x4 crop
    ds = build_dataset(_cfg(dataset="folder", root=str(tmp_path), image_size=4), "train")
    assert ds.as_uint8(progress=False).shape == (2, 3, 4, 4)
    assert ds[1][0].size == (4, 4)
    # data.resize, when set, is the stored size (the eval view crops image_size from it)
    ds = build_dataset(_cfg(dataset="folder", root=str(tmp_path), image_size=4, resize=5),
                       "train")
    assert ds.images.shape == (2, 5, 5, 3)


def test_flat_folder_is_unlabeled(tmp_path: Path) -> None:
    _write_images(tmp_path, ["b.PNG", "a.jpg", "c.webp"])
    (tmp_path / "notes.txt").write_text("not an image")
    ds = build_dataset(_cfg(dataset="folder", root=str(tmp_path)), "train")
    assert [p.name for p in ds.paths] == ["a.jpg", "b.PNG", "c.webp"]
    assert not ds.has_labels and ds.classes is None and ds.num_classes is None
    assert ds.targets.tolist() == [UNLABELED] * 3 and ds[1][2] == -1


def test_class_folders_with_loose_images_rejected(tmp_path: Path) -> None:
    _write_images(tmp_path / "cats", ["a.png"])
    _write_images(tmp_path, ["stray.png"])
    with pytest.raises(DatasetError, match="stray.png"):
        build_dataset(_cfg(dataset="folder", root=str(tmp_path)), "train")


def test_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=f"data.root={empty} contains no images"):
        build_dataset(_cfg(dataset="folder", root=str(empty)), "train")
    missing = tmp_path / "missing"
    with pytest.raises(DatasetError, match=f"data.root={missing} does not exist"):
        build_dataset(_cfg(dataset="folder", root=str(missing)), "train")
    _write_images(tmp_path / "flat", ["a.png"])
    with pytest.raises(DatasetError, match=f"data.val_root={missing} does not exist"):
        build_dataset(_cfg(dataset="folder", root=str(tmp_path / "flat"), val_root=str(missing)),
                      "val")


def test_corrupt_image_skipped_and_listed_or_strict(tmp_path: Path) -> None:
    _write_images(tmp_path, ["good.png", "z.png"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    ds = build_dataset(_cfg(dataset="folder", root=str(tmp_path), image_size=6), "train")
    assert [p.name for p in ds.paths] == ["good.png", "z.png"] and len(ds.images) == 2
    assert [(p.name, "identify" in r) for p, r in ds.skipped] == [("bad.jpg", True)]
    # the readable images keep their own pixels after the unreadable one is dropped
    assert ds[1][0].getpixel((0, 0)) == (40, 10, 200)
    with pytest.raises(DatasetError, match=f"cannot read image {bad}: .*data.strict=true"):
        build_dataset(_cfg(dataset="folder", root=str(tmp_path), image_size=6, strict=True),
                      "train")
    for name in ("good.png", "z.png"):
        (tmp_path / name).unlink()
    with pytest.raises(DatasetError, match="none of its 1 image files could be read"):
        build_dataset(_cfg(dataset="folder", root=str(tmp_path), image_size=6), "train")


def test_nested_folder_without_labels_and_disk_cache(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    _write_images(root / "2024" / "may", ["a.png"])
    _write_images(root / "2023", ["b.png", "c.png"])
    cfg = _cfg(dataset="folder", root=str(root), image_size=4, labels_from_folders=False,
               cache_dir=str(tmp_path / "cache"))
    ds = build_dataset(cfg, "train")
    assert [ds.relative(i) for i in range(3)] == ["2023/b.png", "2023/c.png", "2024/may/a.png"]
    assert not ds.has_labels and ds.classes is None
    assert isinstance(ds.images, np.memmap)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".npy"]
    labelled = build_dataset(_cfg(dataset="folder", root=str(root), image_size=4), "train")
    assert labelled.classes == ["2023", "2024"] and labelled.targets.tolist() == [0, 0, 1]



def test_cache_key_hashes_the_bytes_of_names(tmp_path: Path) -> None:
    """A name that is not UTF-8 hashes as its bytes; a UTF-8 name as before (caches stay
    valid): sha256 of format 1, size 4, then NUL, path, NUL, version per file."""
    import hashlib
    import os

    from scanclust.data.cache import cache_key

    latin1 = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.png"))  # absent: "missing"
    expected = hashlib.sha256(b"1:4\0" + os.fsencode(tmp_path) + b"/caf\xe9.png\0missing")
    assert cache_key([latin1], 4) == expected.hexdigest()[:20]
    plain = tmp_path / "café.png"
    expected = hashlib.sha256(f"1:4\0{plain}\0missing".encode())
    assert cache_key([plain], 4) == expected.hexdigest()[:20]


def test_digits_split() -> None:
    cfg = _cfg(dataset="digits", image_size=16)
    train, val, pretext = (build_dataset(cfg, s) for s in ("train", "val", "pretext"))
    assert isinstance(train, ArrayDataset)
    assert (len(train), len(val), len(pretext)) == (1437, 360, 1437)
    assert train.classes == [str(d) for d in range(10)]
    # stratified: the 10 classes of 174-183 images each keep 35-37 images in val
    assert np.bincount(val.targets).min() >= 35
    assert np.array_equal(train.targets, pretext.targets)
    image, index, label = val[0]
    assert image.size == (16, 16) and image.mode == "RGB" and label == val.targets[0]
    assert train.images.min() == 0 and train.images.max() == 255
    again = build_dataset(cfg, "val")
    assert np.array_equal(again.images, val.images) and np.array_equal(again.targets, val.targets)
    assert val.describe(3) == "digits/val#3"
    tensor = val.as_uint8(progress=False)
    assert tensor.shape == (360, 3, 16, 16)
    assert torch.equal(tensor[0, 0], torch.from_numpy(val.images[0, :, :, 0]))
    assert val.as_uint8(size=8, progress=False).shape == (360, 3, 8, 8)


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"),
                                          ("cifar20", "cifar-100-python"),
                                          ("stl10", "stl10_binary")])
def test_torchvision_sets_missing(tmp_path: Path, name: str, folder: str) -> None:
    with pytest.raises(DatasetError, match=f"data.root={tmp_path} does not contain .*{folder}"):
        build_dataset(_cfg(dataset=name, root=str(tmp_path)), "train")


def test_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(DatasetError, match=f"could not download CIFAR-10 into data.root={tmp_path}"):
        build_dataset(_cfg(dataset="cifar10", root=str(tmp_path), download=True), "train")


def test_unknown_dataset_and_split() -> None:
    with pytest.raises(DatasetError, match="data.dataset='mnist'"):
        build_dataset(_cfg(dataset="mnist"), "train")
    with pytest.raises(DatasetError, match="split 'test'"):
        build_dataset(_cfg(dataset="digits"), "test")


def _fake_imagenet(root: Path, wnids: list[str]) -> None:
    for split in ("train", "val"):
        for wnid in wnids:
            _write_images(root / split / wnid, [f"{wnid}_0.JPEG"], size=(4, 4))


def test_imagenet_subset(tmp_path: Path) -> None:
    rows = [line.split(maxsplit=1) for line in SUBSET_FILE.read_text().splitlines()]
    wnids = [r[0] for r in rows]
    _fake_imagenet(tmp_path, wnids + ["n99999999"])  # an extra class outside the subset
    cfg = _cfg(dataset="imagenet_50", root=str(tmp_path))
    train = build_dataset(cfg, "train")
    assert len(train) == 50 and train.classes == [r[1] for r in rows]
    assert train.classes[:3] == ["Dipper", "Box Turtle", "Diamondback Snake"]
    assert train.targets.tolist() == list(range(50))
    assert Path(train.describe(0)).parent.name == wnids[0]
    assert len(build_dataset(cfg, "val")) == 50

    full = build_dataset(_cfg(dataset="imagenet", root=str(tmp_path)), "val")
    assert len(full) == 51 and full.classes == sorted(wnids + ["n99999999"])

    gone = tmp_path / "val" / wnids[7]
    (gone / f"{wnids[7]}_0.JPEG").unlink()
    gone.rmdir()
    with pytest.raises(DatasetError, match=f"class folder {wnids[7]} of imagenet_50 missing"):
        build_dataset(cfg, "val")
    with pytest.raises(DatasetError, match="no train folder"):
        build_dataset(_cfg(dataset="imagenet_50", root=str(tmp_path / "nowhere")), "train")


def test_cifar100_coarse_labels(tmp_path: Path) -> None:
    # torchvision's md5 check rejects a fake cifar-100-python, so read the pickles directly
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, coarse in (("train", [4, 1, 14]), ("test", [19, 0])):
        entry = {"data": np.zeros((len(coarse), 3072), np.uint8), "fine_labels": [0] * len(coarse),
                 "coarse_labels": coarse}
        (folder / split).write_bytes(pickle.dumps(entry))
    names = [f"super{k}" for k in range(20)]
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [], "coarse_label_names": names}))
    labels, classes = cifar100_coarse_labels(folder, train=True)
    assert labels.tolist() == [4, 1, 14] and labels.dtype == np.int64 and classes == names
    assert cifar100_coarse_labels(folder, train=False)[0].tolist() == [19, 0]
    (folder / "meta").unlink()
    with pytest.raises(DatasetError, match=str(folder)):
        cifar100_coarse_labels(folder, train=True)
