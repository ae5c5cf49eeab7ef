"""One GPU's images/s on the ImageNet recipe, and the wall time of ImageNet-1k on W GPUs.

The ``imagenet`` config's work per stage (MoCo v2 weights: no pretext training):

    mine       one eval pass over train + val (1.28M + 50k images), ResNet-50 features
    scan       100 epochs: frozen ResNet-50 forward + 10 heads x 1000 clusters, SimCLR views
    selflabel  25 epochs: ResNet-50 forward (weak view, no grad) + forward/backward (strong view)
    evaluate   two eval passes over val

Each stage's step is timed here through the package's own step body, ``TrainStep`` and loop,
on random 256 px images held on the device (the device path): the GPU's own rate, at the
per-GPU batch of a W-GPU run (the config's global batch / W). The estimate

    T(W) = sum over stages of  epochs x N / (W x e x min(r_stage, d))

takes the per-GPU rate r, the per-GPU input rate d (JPEG decoding and augmentation:
``benchmarks/jpeg_decode.py``, ``--input-rate``; unbounded if not given) and a scaling
efficiency e (``--efficiency``, 0.9 by default: the gradient all-reduce of ResNet-50 between 8
GPUs of one node costs a few per cent of a step). Prints a table and one JSON line.

    python benchmarks/imagenet_rate.py --world 8 --input-rate 3000   # on one GPU
    python benchmarks/imagenet_rate.py --quick                       # CPU smoke run, tiny net
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import StepLoop, images_per_second, machine, sync  # noqa: E402
from scanclust.config import load_config  # noqa: E402
from scanclust.data.datasets import ArrayDataset  # noqa: E402
from scanclust.data.pipelines import Batches, DevicePath  # noqa: E402
from scanclust.engine import build_scheduler, prepare_model, train_one_epoch  # noqa: E402
from scanclust.models import build_cluster_model  # noqa: E402
from scanclust.runtime import resolve_device  # noqa: E402
from scanclust.stages.mine import extract_features  # noqa: E402
from scanclust.stages.scan import scan_body  # noqa: E402
from scanclust.stages.selflabel import selflabel_body  # noqa: E402

TRAIN, VAL = 1_281_167, 50_000


def step_rate(stage: str, cfg, data: DevicePath, dataset: ArrayDataset, batch: int,
              device: torch.device, warmup: int, steps: int) -> float:
    """Images/s of ``stage``'s training step at ``batch`` images per step."""
    sc = getattr(cfg, stage)
    heads = cfg.scan.num_heads if stage == "scan" else 1
    model = build_cluster_model(cfg, 1000, heads)
    if not sc.update_backbone:
        model.freeze_backbone()
    forward = prepare_model(model, cfg, device, train=True)
    if stage == "scan":
        neighbors = np.random.default_rng(0).integers(0, len(dataset), (len(dataset), 20))
        augment = data.augment(dataset, {"anchor": sc.augment, "neighbor": sc.augment},
                               neighbors)
        body = scan_body(forward, augment, sc.entropy_weight, device, cfg.amp)
    else:
        augment = data.augment(dataset, {"weak": "eval", "strong": sc.augment})
        body = selflabel_body(forward, augment, 0.0, True, device, cfg.amp)
    loop = StepLoop(stage, cfg, None, model, body, data, augment, len(dataset), device)
    loop.scheduler = build_scheduler(loop.optimizer, sc.optim, 10_000)
    loop.train_mode = lambda: model.train_mode(sc.update_backbone)  # type: ignore[method-assign]
    epochs = (data.batches(augment, batch, shuffle=True, seed=e, train=True)
              for e in itertools.count())
    stream = itertools.chain.from_iterable(epochs)

    def run(n: int) -> None:
        train_one_epoch(loop, Batches(itertools.islice(stream, n), n), stage)

    return images_per_second(run, batch, device, warmup, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=8, help="GPUs of the estimated run")
    parser.add_argument("--input-rate", type=float, help="images/s one GPU's input can feed")
    parser.add_argument("--efficiency", type=float, default=0.9)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny net, 32 px: a CPU smoke run")
    args = parser.parse_args()
    overrides = ["perf.data_path=device", "progress=false"]
    if args.quick:
        overrides += ["device=cpu", "model.backbone=resnet_tiny", "model.width=8",
                      "data.image_size=32", "data.resize=36", "scan.batch_size=64",
                      "selflabel.batch_size=32", "evaluate.batch_size=64"]
        args.warmup, args.steps = 1, 2
    cfg = load_config("imagenet", overrides)
    device = resolve_device(cfg.device)
    size = cfg.data.resize or cfg.data.image_size
    batches = {"scan": cfg.scan.batch_size // args.world,
               "selflabel": cfg.selflabel.batch_size // args.world,
               "mine": cfg.mine.batch_size}
    n = 2 * max(batches.values())
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    dataset = ArrayDataset("random", images, np.zeros(n, dtype=np.int64), None)
    data = DevicePath(cfg, device)

    rates = {}
    model = build_cluster_model(cfg, 1000, 1)
    prepare_model(model, cfg, device)
    model.eval()
    extract_features(model.backbone, data, dataset, batches["mine"], device, cfg.amp,
                     False)  # warm-up
    sync(device)
    start = time.perf_counter()
    extract_features(model.backbone, data, dataset, batches["mine"], device, cfg.amp, False)
    sync(device)
    rates["mine"] = n / (time.perf_counter() - start)
    for stage in ("scan", "selflabel"):
        rates[stage] = step_rate(stage, cfg, data, dataset, batches[stage], device,
                                 args.warmup, args.steps)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    images_per_stage = {"mine": TRAIN + VAL, "scan": cfg.scan.epochs * TRAIN,
                        "selflabel": cfg.selflabel.epochs * TRAIN, "evaluate": 2 * VAL}
    feed = args.input_rate or float("inf")
    seconds = {}
    for stage, count in images_per_stage.items():
        rate = min(rates["mine" if stage == "evaluate" else stage], feed)
        seconds[stage] = count / (args.world * args.efficiency * rate)
    print(f"one {machine()['device']}: per-GPU batch {batches}, {size} px stored, "
          f"{cfg.data.image_size} px views")
    for stage, rate in rates.items():
        print(f"  {stage:10s} {rate:9.0f} images/s")
    print(f"ImageNet-1k on {args.world} GPUs (efficiency {args.efficiency}, input "
          f"{'unbounded' if args.input_rate is None else f'{feed:.0f} images/s per GPU'}):")
    for stage, s in seconds.items():
        print(f"  {stage:10s} {s / 3600:7.2f} h")
    print(f"  {'total':10s} {sum(seconds.values()) / 3600:7.2f} h")
    print(json.dumps({"benchmark": "imagenet_rate", **machine(), "params": vars(args),
                      "per_gpu_batch": batches, "images_per_s": rates,
                      "estimate_hours": {k: v / 3600 for k, v in seconds.items()}}))


if __name__ == "__main__":
    main()
