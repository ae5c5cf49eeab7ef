"""The decode path (JPEG files decoded on the device) against the device path, on real JPEGs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import scanclust
from scanclust.config import ConfigError, load_config
from scanclust.data import build_dataset
from scanclust.data.datasets import FileDataset
from scanclust.data.pipelines import DecodePath
from scanclust.data.pipelines import DevicePath, data_path_for
from tests.conftest import TINY

CPU = torch.device("cpu")


def folder_config(root: Path, **extra: object):
    return load_config("demo", {"data.dataset": "folder", "data.root": str(root),
                                "data.image_size": 32, "data.num_workers": 0, "progress": False,
                                "perf.data_path": "decode", **extra})


def jpeg_files(root: Path) -> FileDataset:
    """The class folders under ``root`` as files read on every access: the ImageNet kind of data
    set, which the decode path is for (a user's folder is decoded once into an array instead,
    ``data/cache.py``)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths: list[Path] = []
    targets: list[int] = []
    for label, name in enumerate(classes):
        files = sorted((root / name).glob("*.jpg"))
        paths += files
        targets += [label] * len(files)
    return FileDataset("jpegs", paths, np.array(targets), classes)


def test_decoded_eval_views_equal_the_device_path(cifar_jpeg: Path) -> None:
    cfg = folder_config(cifar_jpeg / "test")
    ds = jpeg_files(cifar_jpeg / "test")
    assert isinstance(data_path_for(cfg, CPU, ds), DecodePath)
    kwargs = dict(shuffle=False, seed=0, train=False)
    decoded = torch.cat([b["x"] for b in DecodePath(cfg, CPU).views(ds, {"x": "eval"}, 32,
                                                                     **kwargs)])
    held = torch.cat([b["x"] for b in DevicePath(cfg, CPU).views(ds, {"x": "eval"}, 32, **kwargs)])
    assert decoded.shape == held.shape == (100, 3, 32, 32)
    # libjpeg-turbo under both PIL and torchvision: the same pixels, up to one grey level
    # (0.5 / 255 / std after normalisation) where their colour conversions round differently
    assert (decoded - held).abs().max() <= 1 / 255 / 0.5 + 1e-6


def test_decoded_pairs_show_a_mined_neighbour(cifar_jpeg: Path) -> None:
    cfg = folder_config(cifar_jpeg / "test")
    ds = jpeg_files(cifar_jpeg / "test")
    path = DecodePath(cfg, CPU)
    neighbors = np.stack([(np.arange(100) + k) % 100 for k in (1, 2)], axis=1)
    augment = path.augment(ds, {"anchor": "strong", "neighbor": "strong"}, neighbors)
    batches = path.batches(augment, 16, shuffle=True, seed=0, train=True)
    items = [augment(b) for b in batches]
    assert len(items) == len(batches) == 6  # 100 // 16, the partial batch dropped
    offsets = torch.cat([(i["neighbor_index"] - i["index"]) % 100 for i in items])
    assert set(offsets.tolist()) == {1, 2}
    assert items[0]["anchor"].shape == items[0]["neighbor"].shape == (16, 3, 32, 32)
    assert len(set(torch.cat([i["index"] for i in items]).tolist())) == 96


def test_a_png_named_jpg_is_decoded_on_the_host(tmp_path: Path) -> None:
    for name, colour in (("red.jpg", (255, 0, 0)), ("blue.jpg", (0, 0, 255))):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
        (tmp_path / name).write_bytes(buffer.getvalue())
    cfg = folder_config(tmp_path, **{"data.image_size": 8})
    ds = FileDataset("pngs", sorted(tmp_path.glob("*.jpg")), np.full(2, -1), None)
    (batch,) = DecodePath(cfg, CPU).views(ds, {"x": "eval"}, 2, shuffle=False, seed=0,
                                          train=False)
    red = batch["x"][[i for i, p in enumerate(ds.paths) if p.name == "red.jpg"][0]]
    assert red[0].min() > red[1].max()  # red channel high, green low: decoded as RGB


def test_a_data_set_in_memory_cannot_take_the_decode_path() -> None:
    cfg = load_config("demo", {"perf.data_path": "decode", "data.image_size": 8})
    ds = build_dataset(cfg.data, "train")
    with pytest.raises(ConfigError, match="perf.data_path.*decode reads image files"):
        DecodePath(cfg, CPU).augment(ds, {"x": "eval"})


def test_decode_path_trains_the_pretext(cifar_jpeg: Path, tmp_path: Path) -> None:
    (tmp_path / "imagenet").mkdir()
    for split in ("train", "val"):  # ImageNet's layout
        (tmp_path / "imagenet" / split).symlink_to(cifar_jpeg / "test")
    ov = [o for o in TINY if not o.startswith(("data.dataset", "data.image_size", "data.max"))]
    ov += ["data.dataset=imagenet", f"data.root={tmp_path / 'imagenet'}", "data.image_size=32",
           "data.resize=32", "perf.data_path=decode", "pretext.epochs=1"]
    summary = scanclust.pretext("demo", tmp_path / "run", overrides=ov)
    assert summary["data_path"] == "decode" and np.isfinite(summary["final_loss"])
