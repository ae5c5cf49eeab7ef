"""Images per second of the pretext, SCAN and self-label training steps: ours against a
straightforward implementation, in the same run, on the same device.

    ours      data set on the device as one uint8 tensor, batched per-sample augmentation,
              bf16 autocast (CUDA), channels_last, fused optimizer (CUDA)
    baseline  torchvision PIL transforms in DataLoader workers, fp32, NCHW, default optimizer

Both run the package's own training loops (``train_one_epoch`` of each stage) on the same
CIFAR-10 images, decoded once into memory (as torchvision's CIFAR10 holds them). Each
measurement skips warm-up steps, then times ``--steps`` steps; ``--repeats`` alternates the
two implementations and reports mean and std. Prints a table and one JSON line.

    python benchmarks/throughput.py                      # GPU: ResNet-18, paper batch sizes
    python benchmarks/throughput.py --quick              # CPU smoke run: tiny net, few steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (DEFAULT_ARCHIVE, cifar10_jpeg, images_per_second,  # noqa: E402
                               machine, training_steps)
from scanclust.config import Config, load_config  # noqa: E402
from scanclust.runtime import resolve_device  # noqa: E402

STEPS = ("pretext", "scan", "selflabel")


def variant_config(base: list[str], ours: bool, device: torch.device, workers: int) -> Config:
    if ours:
        extra = ["perf.data_path=device", "amp=true", "perf.channels_last=true",
                 f"perf.optimizer_impl={'fused' if device.type == 'cuda' else 'auto'}"]
    else:
        extra = ["perf.data_path=workers", "amp=false", "perf.channels_last=false",
                 "perf.optimizer_impl=auto", f"data.num_workers={workers}"]
    return load_config("cifar10", base + extra + [f"device={device}", "progress=false"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE,
                        help="cifar10-jpeg.tar.gz or its extracted folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, help="timed steps (default 30; 5 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 8; 2 with --quick)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers of the baseline")
    parser.add_argument("--quick", action="store_true",
                        help="CPU run: tiny ResNet (width 16), batches of 64")
    parser.add_argument("--only", choices=STEPS, nargs="*", default=list(STEPS))
    args = parser.parse_args()

    device = resolve_device(args.device)
    base = []
    if args.quick:
        base = ["model.backbone=resnet_tiny", "model.width=16", "pretext.batch_size=64",
                "scan.batch_size=64", "selflabel.batch_size=64"]
    args.steps = args.steps or (5 if args.quick else 30)
    args.warmup = args.warmup or (2 if args.quick else 8)
    probe = load_config("cifar10", base)
    largest = max(probe.pretext.batch_size, probe.scan.batch_size, probe.selflabel.batch_size)
    limit = largest * (args.steps + args.warmup) + largest
    dataset = cifar10_jpeg(args.data, "train", limit=min(limit, 50_000))
    rng = np.random.default_rng(0)
    neighbors = rng.integers(0, len(dataset), size=(len(dataset), 20))

    results = {}
    for step in args.only:
        runs: dict[str, list[float]] = {"ours": [], "baseline": []}
        for _ in range(args.repeats):
            for name in ("ours", "baseline"):
                cfg = variant_config(base, name == "ours", device, args.workers)
                run = training_steps(step, cfg, dataset, neighbors, device)
                runs[name].append(images_per_second(run, getattr(cfg, step).batch_size, device,
                                                    args.warmup, args.steps))
        stats = {name: {"mean": statistics.mean(v),
                        "std": statistics.pstdev(v) if len(v) > 1 else 0.0, "runs": v}
                 for name, v in runs.items()}
        stats["ratio"] = stats["ours"]["mean"] / stats["baseline"]["mean"]
        results[step] = stats
        print(f"{step:10s} ours {stats['ours']['mean']:9.0f} ± {stats['ours']['std']:6.0f} img/s"
              f"   baseline {stats['baseline']['mean']:9.0f} ± {stats['baseline']['std']:6.0f}"
              f" img/s   ratio {stats['ratio']:.2f}x", flush=True)
    record = {"benchmark": "throughput", **machine(), "quick": args.quick,
              "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "images": len(dataset), "results": results}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
