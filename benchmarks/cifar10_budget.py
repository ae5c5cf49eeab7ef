"""CIFAR-10, the whole SCAN pipeline under a wall-clock budget (default 8 minutes), everything
included: decoding the JPEGs, timing, training, mining, k-means and evaluation.

The recipe is a config (default: the built-in ``cifar10_fast``); its epoch counts set the split
of time between the stages. The script times a few steps of each training stage, scales all
epoch counts by one factor so that the predicted total fits the budget, runs pretext and mining,
then rescales the SCAN and self-label epochs to the time actually left (the first estimate
misses checkpoints and validation passes). It reports k-means, SCAN and self-label ACC / NMI /
ARI on the test split, the epochs run, images/s and seconds per stage, as one JSON line (also
written to ``--out``/budget.json and ``--json``). Run ``benchmarks/ablate.py`` on its run
directory to try other mine/SCAN/self-label settings on the same pretext.

    python benchmarks/cifar10_budget.py --budget 480 --out runs/budget       # one GPU
    python benchmarks/cifar10_budget.py --quick --out /tmp/b                  # CPU smoke run
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

from benchmarks.common import (DEFAULT_ARCHIVE, export_features,  # noqa: E402
                               images_per_second, machine, training_steps)
from scanclust.config import Config, load_config  # noqa: E402
from scanclust.data import build_dataset  # noqa: E402
from scanclust.data.pipelines import data_path_for, num_batches  # noqa: E402
from scanclust.pipeline import STAGE_FUNCTIONS  # noqa: E402
from scanclust.runtime import resolve_device  # noqa: E402

TRAINED = ("pretext", "scan", "selflabel")
RESERVE = 0.04  # of the budget, kept for evaluation (k-means, predictions)
RUN = ["progress=false", "evaluate.figures=false"]
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


def pipeline_arguments(doc: str, config: str, out: str, features_help: str,
                       quick_help: str) -> argparse.ArgumentParser:
    """The options the whole-pipeline CIFAR-10 benchmarks share (this one and the paper's)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE,
                        help="cifar10-jpeg.tar.gz or its extracted folder")
    parser.add_argument("--config", default=config, help="the recipe (name or YAML)")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--json", type=Path, help="also write the JSON record here")
    parser.add_argument("--features", type=Path, help=features_help)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--set", nargs="*", default=[], metavar="section.key=value",
                        help="config overrides applied after the recipe")
    return parser


def folder_overrides(root: Path, device: str) -> list[str]:
    """The JPEG tree as a folder data set: train/ to train on, test/ as the val split."""
    return ["data.dataset=folder", f"data.root={root / 'train'}",
            f"data.val_root={root / 'test'}", f"device={device}"]


def seconds_per_epoch(stage: str, cfg: Config, dataset, device: torch.device) -> float:
    """Time a few steps of the stage's own step and loop, scaled to one epoch."""
    neighbors = np.random.default_rng(0).integers(0, len(dataset), (len(dataset), 20))
    run = training_steps(stage, cfg, dataset, neighbors, device)
    batch_size = getattr(cfg, stage).batch_size
    rate = images_per_second(run, batch_size, device, warmup=4, steps=6)
    return num_batches(len(dataset), batch_size, True)[1] * batch_size / rate


def scaled(epochs: dict[str, int], factor: float) -> dict[str, int]:
    return {s: max(1, math.floor(e * factor)) for s, e in epochs.items()}


def main() -> None:
    parser = pipeline_arguments(__doc__, "cifar10_fast", "runs/cifar10-budget",
                                "write the mining features of train and test here (.npz)",
                                "CPU smoke run: tiny ResNet on 2,000 images, 60 s budget")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds, all included")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.quick and args.budget == 480.0:
        args.budget = 60.0
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} exists; choose another --out")

    root = prepare_data(args.data, args.out.parent / ".data")
    overrides = RUN + (QUICK if args.quick else []) + args.set + folder_overrides(root,
                                                                                 args.device)
    cfg = load_config(args.config, overrides)
    device = resolve_device(cfg.device)
    train = build_dataset(cfg.data, "train")
    data_path_for(cfg, device, train).views(train, {"image": "eval"}, 1, shuffle=False, seed=0,
                                            train=False)  # decode once
    loaded = time.perf_counter() - started

    recipe = {s: getattr(cfg, s).epochs for s in TRAINED}
    epoch_seconds = {s: seconds_per_epoch(s, cfg, train, device) for s in TRAINED}
    calibrated = time.perf_counter() - started
    available = args.budget * (1 - RESERVE) - calibrated
    factor = available / sum(recipe[s] * epoch_seconds[s] for s in TRAINED)
    epochs = scaled(recipe, factor)
    print(f"loaded data in {loaded:.1f} s, calibrated in {calibrated - loaded:.1f} s; seconds "
          f"per epoch {json.dumps({k: round(v, 2) for k, v in epoch_seconds.items()})}; "
          f"recipe epochs x {factor:.2f} = {epochs}", flush=True)

    stage_seconds: dict[str, float] = {}
    for name, stage in STAGE_FUNCTIONS.items():
        if name == "scan":
            # what is left, shared as the recipe shares it, with the epoch times corrected by
            # how far the pretext estimate was off (checkpoints, validation, clocks)
            drift = stage_seconds["pretext"] / (epochs["pretext"] * epoch_seconds["pretext"])
            left = args.budget * (1 - RESERVE) - (time.perf_counter() - started)
            need = sum(recipe[s] * epoch_seconds[s] * drift for s in ("scan", "selflabel"))
            epochs.update(scaled({s: recipe[s] for s in ("scan", "selflabel")}, left / need))
        if name in epochs:
            cfg = load_config(cfg, {f"{name}.epochs": epochs[name]})
        t = time.perf_counter()
        stage(cfg, args.out)
        stage_seconds[name] = round(time.perf_counter() - t, 2)
        print(f"{name} done in {stage_seconds[name]:.1f} s"
              + (f" ({epochs[name]} epochs)" if name in epochs else ""), flush=True)
        if name == "mine" and args.features:
            exported = export_features(args.out, args.features, {
                "made_by": "benchmarks/cifar10_budget.py", "config": args.config,
                "pretext_epochs": epochs["pretext"], "features": cfg.mine.features, **machine()})
            print(f"mining features: {json.dumps(exported)}", flush=True)
    metrics = json.loads((args.out / "metrics.json").read_text())
    images_per_s, steps = {}, {}
    for name in TRAINED:
        summary = json.loads((args.out / name / "summary.json").read_text())
        images_per_s[name] = round(len(train) * summary["epochs"] / max(summary["seconds"], 1e-9))
        steps[name] = summary.get("step")
    record = {
        "benchmark": "cifar10_budget", **machine(), "config": args.config,
        "budget_s": args.budget, "wall_s": round(time.perf_counter() - started, 1),
        "load_s": round(loaded, 1), "calibration_s": round(calibrated - loaded, 1),
        "recipe_epochs": recipe, "epochs": epochs, "seconds": stage_seconds,
        "images_per_s": images_per_s, "step": steps, "neighbors": metrics["neighbors"],
        "stages": {k: {m: round(v[m], 4) for m in ("acc", "nmi", "ari")}
                   for k, v in metrics["stages"].items()},
        "overrides": overrides,
    }
    (args.out / "budget.json").write_text(json.dumps(record, indent=2) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
