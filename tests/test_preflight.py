"""Limits of later stages are checked before pretext trains, and before any file is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import scanclust
from scanclust.config import ConfigError, load_config
from scanclust.data import ImageDataset
from scanclust.preflight import num_clusters, preflight
from tests.conftest import TINY


def _images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _folder_config(root: Path, *extra: str):
    return load_config("demo", ["data.dataset=folder", f"data.root={root}", "data.image_size=8",
                                "mine.topk=5",
                                *extra])


def test_unlabelled_folder_needs_the_number_of_clusters(tmp_path: Path) -> None:
    cfg = _folder_config(_images(tmp_path / "flat", 20))
    with pytest.raises(ConfigError, match="'model.num_clusters': the data set has no labels"):
        preflight(cfg)
    preflight(_folder_config(tmp_path / "flat", "model.num_clusters=4"))


def test_class_folders_give_the_number_of_clusters(tmp_path: Path) -> None:
    for name in ("cat", "dog", "owl"):
        _images(tmp_path / "tree" / name, 4)
    cfg = _folder_config(tmp_path / "tree")
    assert num_clusters(cfg, scanclust.data.build_dataset(cfg.data, "train")) == 3


def test_labels_without_class_names_count_the_labels() -> None:
    dataset = ImageDataset("stl-like", np.array([0, 4, 2, -1, 1, 3]), None)
    assert num_clusters(load_config("demo"), dataset) == 5


@pytest.mark.parametrize("override, key", [("model.num_clusters=40", "model.num_clusters"),
                                           ("mine.topk=30", "mine.topk")])
def test_pretext_refuses_before_training_and_writes_nothing(tmp_path: Path, override: str,
                                                            key: str) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=key):
        scanclust.pretext("demo", out, overrides=TINY + ["data.max_images=30", override])
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_device_is_refused_before_any_folder_is_made(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="'device': cuda but no CUDA device"):
        scanclust.pretext("demo", out, overrides=TINY + ["device=cuda"])
    assert not out.exists()
