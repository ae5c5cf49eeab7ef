"""CIFAR-10, the whole SCAN pipeline under a wall-clock budget (default 8 minutes).

The paper's 87.6 % took about 6 hours on one GPU. This script asks how far the same method
gets in a fixed time: it times a few steps of each training stage, turns the budget left
after loading the data into pretext epochs (66 %), runs pretext and mining, then splits what
is left into SCAN and self-label epochs (17 : 12), keeping 4 % for evaluation. The stages are
the package's own; it reports k-means, SCAN and self-label ACC / NMI / ARI on the test
split, images/s and seconds per stage, as one JSON line (also written to --out).

    python benchmarks/cifar10_budget.py --budget 480 --out runs/budget      # one GPU
    python benchmarks/cifar10_budget.py --quick                              # CPU smoke run

Recipe (the paper's losses, augmentations and model; batch sizes and learning rates set for
a short schedule on one GPU): ResNet-18 (CIFAR stem), SimCLR batch 512, SGD lr 0.4 cosine,
temperature 0.1; K = 20 neighbours; SCAN batch 512, Adam 1e-4 x 4 (linear scaling from the
paper's batch 128); self-label batch 1000, Adam 1e-4, threshold 0.99; data on the GPU with
batched augmentation, bf16, channels_last. Any config key can be overridden with --set.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (DEFAULT_ARCHIVE, images_per_second, machine,  # noqa: E402
                               training_steps)
from scanclust.config import Config, load_config  # noqa: E402
from scanclust.data import build_dataset  # noqa: E402
from scanclust.data.paths import data_path_for, num_batches  # noqa: E402
from scanclust.pipeline import STAGE_FUNCTIONS  # noqa: E402
from scanclust.runtime import resolve_device  # noqa: E402

SHARES = {"pretext": 0.66, "scan": 0.17, "selflabel": 0.12}
RESERVE = 0.04  # of the budget, kept for evaluation (k-means, predictions)
RECIPE = [
    "perf.data_path=device", "amp=true", "perf.channels_last=true", "progress=false",
    "evaluate.figures=false", "evaluate.kmeans_restarts=3",
    "scan.batch_size=512", "scan.optim.lr=0.0004",
]
QUICK = [
    "model.backbone=resnet_tiny", "model.width=16", "pretext.batch_size=128",
    "scan.batch_size=128", "selflabel.batch_size=200", "data.max_images=2000",
]


def prepare_data(source: Path, work: Path) -> Path:
    """The JPEG tree (extracting the archive into ``work`` if given the .tar.gz)."""
    if source.is_dir():
        return source
    target = work / "cifar10-jpeg"
    if not (target / "test").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(source, "r:gz") as tar:
            tar.extractall(target, filter="data")
    roots = [p.parent for p in target.rglob("train") if (p.parent / "test").is_dir()]
    if not roots:
        raise FileNotFoundError(f"{source} holds no train/ and test/ folders")
    return roots[0]


def seconds_per_epoch(step: str, cfg: Config, dataset, device: torch.device) -> float:
    """Time a few steps of the stage's own training loop and scale to one epoch."""
    neighbors = np.random.default_rng(0).integers(0, len(dataset), (len(dataset), 20))
    run = training_steps(step, cfg, dataset, neighbors, device)
    batch_size = getattr(cfg, step).batch_size
    rate = images_per_second(run, batch_size, device, warmup=3, steps=6)
    return num_batches(len(dataset), batch_size, True)[1] * batch_size / rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE,
                        help="cifar10-jpeg.tar.gz or its extracted folder")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds, all included")
    parser.add_argument("--out", type=Path, default=Path("runs/cifar10-budget"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: tiny ResNet on 2,000 images, 60 s budget")
    parser.add_argument("--set", nargs="*", default=[], metavar="section.key=value",
                        help="config overrides applied after the recipe")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.quick and args.budget == 480.0:
        args.budget = 60.0
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} exists; choose another --out")

    root = prepare_data(args.data, args.out.parent / ".data")
    overrides = RECIPE + (QUICK if args.quick else []) + args.set + [
        "data.dataset=folder", f"data.root={root / 'train'}", f"data.val_root={root / 'test'}",
        f"device={args.device}"]
    cfg = load_config("cifar10", overrides)
    device = resolve_device(cfg.device)
    train = build_dataset(cfg.data, "train")
    data_path_for(cfg, device, train).views(train, {"image": "eval"}, 1, shuffle=False, seed=0,
                                            train=False)  # decode once, outside the timings
    loaded = time.perf_counter() - started

    epoch_seconds = {s: seconds_per_epoch(s, cfg, train, device) for s in SHARES}
    calibrated = time.perf_counter() - started
    epochs = {"pretext": max(1, math.floor(SHARES["pretext"] * (args.budget - calibrated)
                                           / epoch_seconds["pretext"]))}
    print(f"loaded data in {loaded:.1f} s, calibrated in {calibrated - loaded:.1f} s; "
          f"seconds per epoch {json.dumps({k: round(v, 2) for k, v in epoch_seconds.items()})}",
          flush=True)

    stage_seconds: dict[str, float] = {}
    for name, stage in STAGE_FUNCTIONS.items():
        if name == "scan":
            # share what is left between SCAN and self-label, with the epoch times corrected
            # by how far the pretext estimate was off (checkpoints, validation, clocks)
            drift = stage_seconds["pretext"] / (epochs["pretext"] * epoch_seconds["pretext"])
            left = args.budget - (time.perf_counter() - started) - RESERVE * args.budget
            for s in ("scan", "selflabel"):
                share = SHARES[s] / (SHARES["scan"] + SHARES["selflabel"])
                epochs[s] = max(1, math.floor(share * left / (epoch_seconds[s] * drift)))
        if name in epochs:
            cfg = load_config(cfg, {f"{name}.epochs": epochs[name]})
        t = time.perf_counter()
        stage(cfg, args.out)
        stage_seconds[name] = round(time.perf_counter() - t, 2)
        print(f"{name} done in {stage_seconds[name]:.1f} s"
              + (f" ({epochs[name]} epochs)" if name in epochs else ""), flush=True)
    metrics = json.loads((args.out / "metrics.json").read_text())
    images_per_s = {}
    for name in SHARES:
        summary = json.loads((args.out / name / "summary.json").read_text())
        images_per_s[name] = round(len(train) * summary["epochs"] / max(summary["seconds"], 1e-9))
    record = {
        "benchmark": "cifar10_budget", **machine(), "budget_s": args.budget,
        "wall_s": round(time.perf_counter() - started, 1), "load_s": round(loaded, 1),
        "calibration_s": round(calibrated - loaded, 1), "epochs": epochs,
        "seconds": stage_seconds, "images_per_s": images_per_s,
        "neighbors": metrics["neighbors"],
        "stages": {k: {m: round(v[m], 4) for m in ("acc", "nmi", "ari")}
                   for k, v in metrics["stages"].items()},
        "overrides": overrides,
    }
    (args.out / "budget.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
