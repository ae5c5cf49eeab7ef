"""What the benchmarks share: CIFAR-10 from the JPEG archive, the machine, the commit."""

from __future__ import annotations

import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
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
from scanclust.data.pipelines import Batches, data_path_for
from scanclust.engine import Loop, build_scheduler, prepare_model, train_one_epoch
from scanclust.models import build_cluster_model, build_contrastive_model
from scanclust.rundir import RunDir
from scanclust.stages.pretext import contrastive_body
from scanclust.stages.scan import scan_body
from scanclust.stages.selflabel import selflabel_body

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
        files = [(label, f) for label, name in enumerate(CLASSES)
                 for f in sorted((source / split / name).glob("*.jpg"))[:per_class]]
        with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
            images = list(pool.map(lambda item: np.asarray(Image.open(item[1]).convert("RGB")),
                                   files, chunksize=256))
        labels = [label for label, _ in files]
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


def report(result: dict, path: Path | None) -> None:
    """Print ``result`` as one JSON line, and write it to ``path`` when one is given."""
    line = json.dumps(result)
    print(line)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(line + "\n")


def machine() -> dict[str, str]:
    """Where a figure was measured: device name, torch version, CPU count, commit."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    commit = os.environ.get("SCANCLUST_COMMIT") or _git_commit()  # a copied tree has no .git
    return {"device": device, "torch": torch.__version__, "commit": commit,
            "date": time.strftime("%Y-%m-%d")}


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepLoop(Loop):
    """The engine's loop without a stage's bookkeeping: every step trains, losses summed."""

    def epoch_stats(self, loss: torch.Tensor, steps: int, skipped: int) -> dict:
        return {"loss": float(loss.sum()) / max(steps, 1)}


def training_steps(step: str, cfg: Config, dataset: ImageDataset, neighbors: np.ndarray,
                   device: torch.device) -> Callable[[int], dict]:
    """A function running the next ``n`` training steps of a stage, through the stage's own
    step body, the engine's ``train_one_epoch`` and the data path, on a fresh model.
    Self-label runs with threshold 0 so every step trains (a real run skips batches with no
    confident sample)."""
    torch.manual_seed(0)
    data = data_path_for(cfg, device, dataset)
    model = build_contrastive_model(cfg) if step == "pretext" else build_cluster_model(cfg, 10, 1)
    sc = getattr(cfg, step)
    forward = prepare_model(model, cfg, device)
    if step == "pretext":
        augment = data.augment(dataset, {"view1": "simclr", "view2": "simclr"})
        body = contrastive_body(forward, augment, sc.temperature, device, cfg.amp)
    elif step == "scan":
        augment = data.augment(dataset, {"anchor": "strong", "neighbor": "strong"}, neighbors)
        body = scan_body(forward, augment, sc.entropy_weight, device, cfg.amp)
    else:
        augment = data.augment(dataset, {"weak": "eval", "strong": "strong"})
        body = selflabel_body(forward, augment, 0.0, True, device, cfg.amp)
    loop = StepLoop(step, cfg, None, model, body, data, augment, len(dataset), device)
    loop.scheduler = build_scheduler(loop.optimizer, sc.optim, 10_000)
    stream = itertools.chain.from_iterable(_epochs(data, augment, sc.batch_size))

    def run(n: int) -> dict:
        """The next ``n`` steps; returns the loop's statistics (mean loss, images/s)."""
        return train_one_epoch(loop, Batches(itertools.islice(stream, n), n), step)

    run.step = loop.step  # type: ignore[attr-defined]  # its .mode says eager or cuda_graph
    return run


def _epochs(data, augment, batch_size: int):
    """Epoch after epoch of batches, so a measurement never runs out of data."""
    for epoch in itertools.count():
        yield data.batches(augment, batch_size, shuffle=True, seed=epoch, train=True)


def images_per_second(run: Callable[[int], dict], batch_size: int, device: torch.device,
                      warmup: int, steps: int) -> float:
    """Throughput of ``steps`` steps after ``warmup`` untimed ones (compilation, autotuning)."""
    run(warmup)
    sync(device)
    start = time.perf_counter()
    run(steps)
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def export_features(run: Path, path: Path, about: dict) -> dict:
    """A run's mining features of its train and val (for CIFAR-10: test) splits with their
    labels, as one compressed ``.npz`` for cached-feature work on a CPU: arrays ``features`` /
    ``targets`` (train, what ``benchmarks/choose_k.py`` reads), ``test_features`` /
    ``test_targets``, and ``about`` (a JSON string: how they were made). Features stay float16,
    as mining stores them. Returns the file's size and the arrays' shapes."""
    run_dir = RunDir(run)
    arrays = {}
    for split, prefix in (("train", ""), ("val", "test_")):
        if run_dir.features(split).exists():
            arrays[f"{prefix}features"] = np.load(run_dir.features(split))
            arrays[f"{prefix}targets"] = np.load(
                run_dir.stage_dir("mine") / f"targets_{split}.npy").astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(partial, **arrays, about=np.array(json.dumps(about)))
    os.replace(partial, path)
    return {"path": str(path), "megabytes": round(path.stat().st_size / 1e6, 2),
            "shapes": {k: list(v.shape) for k, v in arrays.items()},
            "dtype": str(arrays["features"].dtype)}
