"""CPU training speed with NCHW against channels-last (NHWC) activations, in the same run.

``perf.channels_last`` was made for bf16 convolutions on GPUs. On a CPU it runs oneDNN's NHWC
kernels, whose backward pass of a 1x1 stride-2 convolution is wrong on some CPUs and crashes on
others (``runtime.channels_last``), so the package trains in NCHW on a CPU and keeps NHWC for
inference there. This measures what that costs: both layouts forced for training as well
(the package's own choice is bypassed here), through the package's own step bodies and
``train_one_epoch`` loops, on two recipes:

    demo   the demo config (digits at 16 px, tiny ResNet of width 16, batch 128): the pretext
           and the SCAN step (whole network trained)
    cpu    the ``scanclust cluster --preset cpu`` recipe (tiny ResNet of width 16 at 32 px,
           batch 256) on CIFAR-10 JPEGs: the pretext step, and the eval-view inference that
           mining and the cached SCAN / self-label features run

Each variant skips ``--warmup`` steps, times ``--steps``; ``--repeats`` alternates the layouts
and reports mean and std of images/s and the NHWC / NCHW ratio. One JSON line (``--json``
writes it to a file too).

    python benchmarks/cpu_layout.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (DEFAULT_ARCHIVE, cifar10_jpeg, images_per_second,  # noqa: E402
                               machine, report, training_steps)
from scanclust.folder import plan  # noqa: E402
from scanclust.config import load_config  # noqa: E402
from scanclust.data import build_dataset  # noqa: E402
from scanclust.data.pipelines import data_path_for, to_device  # noqa: E402
from scanclust.models import build_backbone  # noqa: E402
import scanclust.data.pipelines.device  # noqa: E402
import scanclust.data.pipelines.jpeg  # noqa: E402
import scanclust.data.pipelines.workers  # noqa: E402
import scanclust.engine  # noqa: E402
from scanclust.runtime import channels_last_fault  # noqa: E402
from scanclust.engine import prepare_model  # noqa: E402

CPU = torch.device("cpu")


def forced_layout(cfg, device, training: bool) -> bool:
    """The setting as given, for training too: what the measurement compares."""
    return cfg.perf.channels_last


for module in (scanclust.data.pipelines.device, scanclust.data.pipelines.workers,
               scanclust.data.pipelines.jpeg, scanclust.engine):
    module.channels_last = forced_layout


def recipe(name: str, layout: bool):
    common = {"device": "cpu", "amp": False, "progress": False,
              "perf.channels_last": layout, "perf.data_path": "device"}
    if name == "demo":
        cfg = load_config("demo", common)
        return cfg, build_dataset(cfg.data, "train")
    settings = plan("cpu", "scratch", 3000, 32)
    settings.update({"data.dataset": "folder", "model.num_clusters": 10, **common})
    return load_config(None, settings), None


def inference_rate(cfg, dataset, steps: int, warmup: int) -> float:
    """Eval-view backbone features, as mining and the feature cache compute them."""
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model.backbone, cfg.model.width)
    prepare_model(backbone, cfg, CPU).eval()
    data = data_path_for(cfg, CPU, dataset)
    batches = list(data.views(dataset, {"image": "eval"}, 512, shuffle=False, seed=0,
                              train=False))
    with torch.no_grad():
        for batch in batches[:warmup]:
            backbone(to_device(batch, CPU, cfg.perf.channels_last)["image"])
        start, images = time.perf_counter(), 0
        for batch in (batches * steps)[:steps]:
            backbone(to_device(batch, CPU, cfg.perf.channels_last)["image"])
            images += len(batch["index"])
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    cifar = cifar10_jpeg(args.archive, "train", limit=3000)
    neighbors = {}
    rates: dict[str, dict[str, list[float]]] = {}
    measures = [("demo", "pretext"), ("demo", "scan"), ("cpu", "pretext"), ("cpu", "inference")]
    for _ in range(args.repeats):
        for name, step in measures:
            for layout in (False, True):
                cfg, dataset = recipe(name, layout)
                dataset = dataset if dataset is not None else cifar
                if step == "inference":
                    rate = inference_rate(cfg, dataset, args.steps, args.warmup)
                else:
                    if len(dataset) not in neighbors:
                        rng = np.random.default_rng(0)
                        neighbors[len(dataset)] = rng.integers(0, len(dataset), (len(dataset), 5))
                    run = training_steps(step, cfg, dataset, neighbors[len(dataset)], CPU)
                    batch = getattr(cfg, step).batch_size
                    rate = images_per_second(run, batch, CPU, args.warmup, args.steps)
                key = f"{name}/{step}"
                rates.setdefault(key, {"nchw": [], "nhwc": []})
                rates[key]["nhwc" if layout else "nchw"].append(rate)
                print(f"{key:16s} {'nhwc' if layout else 'nchw'} {rate:8.0f} img/s", flush=True)
    result = {"benchmark": "cpu_layout", **machine(), "threads": torch.get_num_threads(),
              "channels_last_fault": channels_last_fault(), "repeats": args.repeats,
              "steps": args.steps, "results": {}}
    print(f"\n{'':16s} {'NCHW img/s':>16s} {'NHWC img/s':>16s} {'NHWC/NCHW':>10s}")
    for key, by in rates.items():
        row = {lay: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
               for lay, v in by.items()}
        ratios = [b / a for a, b in zip(by["nchw"], by["nhwc"])]
        row["ratio_mean"], row["ratio_min"], row["ratio_max"] = (statistics.mean(ratios),
                                                                 min(ratios), max(ratios))
        result["results"][key] = row
        print(f"{key:16s} {row['nchw']['mean']:9.0f} ± {row['nchw']['std']:4.0f} "
              f"{row['nhwc']['mean']:9.0f} ± {row['nhwc']['std']:4.0f} {row['ratio_mean']:9.2f}x")
    report(result, args.json)


if __name__ == "__main__":
    main()
