"""Which pretrained model ``scanclust cluster --backbone auto`` takes: images/s of candidate
torchvision backbones on this machine, beside what their ImageNet weights are known to give.

Embedding is what a pretrained backbone costs a folder run: one eval pass for mining plus one
per cached view. Random weights run at the speed of the pretrained ones, so no download is
needed to time them. Each candidate runs the package's own path: ``library_backbone`` (the
classifier removed), ``prepare_model`` (NHWC for inference on a CPU), eval views of the
model's own input size in batches of ``--batch``; ``--repeats`` alternates the candidates and
reports mean and std. The ImageNet top-1 accuracy and GFLOPs come from torchvision's weights
metadata (no download). Prints a table and one JSON line (``--json`` writes it to a file).

    python benchmarks/backbones.py --images 256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, sync  # noqa: E402
from scanclust.config import load_config  # noqa: E402
from scanclust.engine import prepare_model  # noqa: E402
from scanclust.models.pretrained import input_settings, library_backbone  # noqa: E402

CANDIDATES = ("mobilenet_v3_large", "efficientnet_b0", "regnet_y_800mf", "regnet_y_1_6gf",
              "resnet50", "convnext_tiny")


def rate(name: str, images: int, batch: int, device: torch.device) -> float:
    """Images/s of ``name``'s forward pass at its own input size, after one warm-up batch."""
    settings = input_settings(name)
    cfg = load_config("demo", {"device": str(device), "amp": device.type == "cuda"})
    torch.manual_seed(0)
    model = prepare_model(library_backbone(name), cfg, device).eval()
    x = torch.rand(batch, 3, settings["image_size"], settings["image_size"], device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
        sync(device)
        start = time.perf_counter()
        for _ in range(max(1, images // batch)):
            model(x)
        sync(device)
    return max(1, images // batch) * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images timed per candidate")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torchvision.models as tvm

    device = torch.device("cpu")
    rates: dict[str, list[float]] = {name: [] for name in args.candidates}
    for _ in range(args.repeats):
        for name in args.candidates:
            rates[name].append(rate(name, args.images, args.batch, device))
            print(f"{name:22s} {rates[name][-1]:7.1f} img/s", flush=True)
    rows = {}
    print(f"\n{'model':22s} {'img/s':>14s} {'s / 3000':>9s} {'GFLOPs':>7s} {'top-1':>6s}")
    for name, values in rates.items():
        meta = tvm.get_model_weights(name).DEFAULT.meta
        top1 = meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
        mean = statistics.mean(values)
        rows[name] = {"images_per_s": mean, "std": statistics.stdev(values) if len(values) > 1
                      else 0.0, "seconds_per_3000": 3000 / mean, "gflops": meta.get("_ops"),
                      "imagenet_top1": top1, "input": input_settings(name)["image_size"]}
        print(f"{name:22s} {mean:7.1f} ± {rows[name]['std']:4.1f} {3000 / mean:9.0f} "
              f"{meta.get('_ops', 0):7.2f} {top1:6.1f}")
    line = json.dumps({"benchmark": "backbones", **machine(), "threads": torch.get_num_threads(),
                       "batch": args.batch, "repeats": args.repeats, "results": rows})
    print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
