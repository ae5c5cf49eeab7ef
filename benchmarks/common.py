"""What the benchmarks share: CIFAR-10 from the JPEG archive, the machine, the commit."""

from __future__ import annotations

import importlib
import itertools
import os
import platform
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from scanclust.config import Config
from scanclust.data.datasets import ArrayDataset, ImageDataset
from scanclust.data.paths import Batches, data_path_for
from scanclust.pretext import build_contrastive_model
from scanclust.scan import build_cluster_model
from scanclust.training import build_optimizer, build_scheduler, prepare_model

# the stage modules hold the training loops (``scanclust.scan`` itself is the stage function)
STAGE_MODULES = {name: importlib.import_module(f"scanclust.{name}")
                 for name in ("pretext", "scan", "selflabel")}

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def cifar10_jpeg(source: Path, split: str, limit: int | None = None) -> ArrayDataset:
    """CIFAR-10 ``split`` ("train" or "test") decoded from the JPEG folder tree or its .tar.gz.

    Decoded once into memory, as torchvision's CIFAR10 holds its data, so both data paths of a
    benchmark start from the same array and neither pays JPEG decoding per step.
    """
    source = Path(source)
    per_class = None if limit is None else max(limit // len(CLASSES), 1)
    images, labels = [], []
    if source.is_dir():
        for label, name in enumerate(CLASSES):
            files = sorted((source / split / name).glob("*.jpg"))[:per_class]
            for f in files:
                images.append(np.asarray(Image.open(f).convert("RGB")))
                labels.append(label)
    else:
        counts = dict.fromkeys(CLASSES, 0)
        with tarfile.open(source, "r:gz") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) < 3 or parts[-3] != split:
                    continue
                name = parts[-2]
                if per_class is not None and counts[name] >= per_class:
                    continue
                with tar.extractfile(member) as handle:
                    images.append(np.asarray(Image.open(handle).convert("RGB")))
                labels.append(CLASSES.index(name))
                counts[name] += 1
    if not images:
        raise FileNotFoundError(f"no {split} images under {source}")
    return ArrayDataset(f"cifar10-jpeg/{split}", np.stack(images), np.array(labels), CLASSES)


def machine() -> dict[str, str]:
    """Where a figure was measured: device name, torch version, CPU count, commit."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"device": device, "torch": torch.__version__, "commit": commit,
            "date": time.strftime("%Y-%m-%d")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_steps(step: str, cfg: Config, dataset: ImageDataset, neighbors: np.ndarray,
                   device: torch.device) -> Callable[[int], None]:
    """A function running the next ``n`` training steps of a stage, through the stage's own
    ``train_one_epoch`` and data path, on a fresh model. Self-label runs with threshold 0 so
    every step trains (a real run skips batches with no confident sample)."""
    torch.manual_seed(0)
    data = data_path_for(cfg, device, dataset)
    model = build_contrastive_model(cfg) if step == "pretext" else build_cluster_model(cfg, 10, 1)
    sc = getattr(cfg, step)
    forward = prepare_model(model, cfg, device)
    optimizer = build_optimizer(model.parameters(), sc.optim, cfg.perf.optimizer_impl)
    scheduler = build_scheduler(optimizer, sc.optim, 10_000)
    if step == "pretext":
        batches = data.views(dataset, {"view1": "simclr", "view2": "simclr"}, sc.batch_size,
                             shuffle=True, seed=0, train=True)
    elif step == "scan":
        batches = data.pairs(dataset, neighbors, "strong", sc.batch_size, seed=0)
    else:
        batches = data.views(dataset, {"weak": "eval", "strong": "strong"}, sc.batch_size,
                             shuffle=True, seed=0, train=True)
    stream = iter(batches)
    loop = STAGE_MODULES[step].train_one_epoch
    common = (device, cfg.amp, cfg.perf.channels_last, False, step)

    def run(n: int) -> None:
        part = Batches(itertools.islice(stream, n), n)
        if step == "pretext":
            loop(forward, part, optimizer, scheduler, sc.temperature, *common)
        elif step == "scan":
            loop(model, forward, part, optimizer, scheduler, sc.entropy_weight, True, *common)
        else:
            loop(model, forward, part, optimizer, scheduler, 0.0, True, True, None, *common)

    return run


def images_per_second(run: Callable[[int], None], batch_size: int, device: torch.device,
                      warmup: int, steps: int) -> float:
    """Throughput of ``steps`` steps after ``warmup`` untimed ones (compilation, autotuning)."""
    run(warmup)
    sync(device)
    start = time.perf_counter()
    run(steps)
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)
