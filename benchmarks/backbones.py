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
    python benchmarks/backbones.py --cluster mobilenet_v3_large --folder-images 3000
        the whole ``scanclust cluster FOLDER --preset cpu --backbone NAME`` on a folder of
        CIFAR-10 train JPEGs (the first N/10 of each class), timed per stage, with the model's
        random weights standing in for its ImageNet ones (the same speed; no download)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DEFAULT_ARCHIVE, machine, report, sync  # noqa: E402
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


def cluster_run(name: str, count: int, archive: Path) -> dict:
    """Seconds of a whole ``cluster --preset cpu --backbone name`` run on ``count`` CIFAR-10
    JPEGs, with random weights in place of the pretrained ones."""
    import tarfile
    import tempfile

    import scanclust.models.pretrained as pretrained
    from scanclust.folder import cluster
    from scanclust.files import read_json

    pretrained.pretrained_state = lambda model: library_backbone(model).state_dict()
    import logging

    logging.getLogger("scanclust").addHandler(logging.StreamHandler(sys.stderr))
    logging.getLogger("scanclust").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        folder, per_class, seen = Path(tmp) / "images", count // 10, {}
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if member.isfile() and len(parts) >= 3 and parts[-3] == "train" and \
                        seen.get(parts[-2], 0) < per_class:
                    seen[parts[-2]] = seen.get(parts[-2], 0) + 1
                    (folder / parts[-2]).mkdir(parents=True, exist_ok=True)
                    (folder / parts[-2] / parts[-1]).write_bytes(tar.extractfile(member).read())
        out = Path(tmp) / "run"
        start = time.perf_counter()
        cluster(folder, out, backbone=name, preset="cpu", overrides=["progress=false"])
        wall = time.perf_counter() - start
        stages = {stage: read_json(out / stage / "summary.json").get("seconds")
                  for stage in ("mine", "scan", "selflabel")
                  if (out / stage / "summary.json").is_file()}
        return {"model": name, "images": sum(seen.values()), "wall_s": round(wall, 1),
                "stage_s": stages, "k": read_json(out / "choose_k.json")["k"]
                if (out / "choose_k.json").is_file() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images timed per candidate")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cluster", metavar="NAME", help="time a whole cluster run instead")
    parser.add_argument("--folder-images", type=int, default=3000)
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    args = parser.parse_args()
    if args.cluster:
        report({"benchmark": "backbones-cluster", **machine(),
                **cluster_run(args.cluster, args.folder_images, args.archive)}, args.json)
        return
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
    report({"benchmark": "backbones", **machine(), "threads": torch.get_num_threads(),
            "batch": args.batch, "repeats": args.repeats, "results": rows}, args.json)


if __name__ == "__main__":
    main()
