"""Shared fixtures: a few hundred real CIFAR-10 JPEGs, and a tiny config for whole runs."""

from __future__ import annotations

import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest

PER_CLASS = {"train": 30, "test": 10}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]

# The pipeline at toy scale: 8x8 digits, a tiny ResNet, two epochs per stage. Seconds, not
# minutes, yet every stage, file and code path of a real run is exercised.
TINY = [
    "device=cpu", "amp=false", "progress=false",
    "data.dataset=digits", "data.image_size=8", "data.max_images=200", "data.num_workers=0",
    "model.backbone=resnet_tiny", "model.width=8", "model.proj_hidden=32", "model.proj_dim=16",
    "pretext.epochs=2", "pretext.batch_size=64",
    "mine.topk=5",
    "scan.epochs=2", "scan.batch_size=64",
    "selflabel.epochs=2", "selflabel.batch_size=100", "selflabel.threshold=0.3",
    "evaluate.kmeans_restarts=1", "evaluate.num_low_confidence=8",
]


def _data_dir() -> Path:
    env = os.environ.get("SCANCLUST_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def cifar_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 train and 10 test images per class, read lazily from the shared archive."""
    archive = _data_dir() / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not found; set SCANCLUST_DATA to the folder holding it")
    out = tmp_path_factory.mktemp("cifar10-jpeg")
    counts: Counter = Counter()
    wanted = sum(PER_CLASS.values()) * len(CIFAR10_CLASSES)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or counts[parts[:2]] >= PER_CLASS[parts[0]]:
                continue
            tar.extract(member, out, filter="data")
            counts[parts[:2]] += 1
            if sum(counts.values()) == wanted:
                break
    return out


