"""A large folder: images/s of the first decode, of reopening the cache, and of later epochs.

    python benchmarks/folder_decode.py [--images 20000] [--size 32] [--workers N]

Extracts ``--images`` CIFAR-10 train JPEGs into one flat folder (not timed), then times:

- ``first_decode``: listing + decoding every file into the run's cache (worker processes);
- ``reopen``: building the data set again, as every later stage does (a cache hit);
- ``epoch_cached``: one epoch of SimCLR views from the cache through the batched data path
  on the CPU (what the stages use; augmentation included, no model);
- ``epoch_cached_workers``: the same with per-sample transforms in DataLoader workers, reading
  the cache;
- ``epoch_files``: the same as before the cache existed: decoding the JPEGs in the workers
  (the last two on at most 5,000 images). The difference of the last two is the decoding
  that the cache saves in every epoch.

Prints one JSON line with images/s of each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DEFAULT_ARCHIVE, machine  # noqa: E402
from scanclust.config import load_config  # noqa: E402
from scanclust.data import build_dataset  # noqa: E402
from scanclust.data.datasets import FileDataset  # noqa: E402
from scanclust.data.pipelines import DevicePath, WorkerPath  # noqa: E402


def extract(archive: Path, folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or "train" not in parts:
                continue
            data = tar.extractfile(member).read()
            (folder / f"{parts[-2]}_{parts[-1]}").write_bytes(data)
            done += 1
            if done == count:
                return


def epoch_rate(path, dataset, batch_size: int, limit: int | None = None) -> float:
    batches = path.views(dataset, {"view1": "simclr", "view2": "simclr"}, batch_size,
                         shuffle=True, seed=0, train=True)
    start, seen = time.perf_counter(), 0
    for batch in batches:
        seen += len(batch["view1"])
        if limit is not None and seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="folder-decode-") as tmp:
        folder, cache = Path(tmp) / "photos", Path(tmp) / "run" / "cache"
        extract(args.archive, folder, args.images)
        cfg = load_config("cifar10", ["data.dataset=folder", f"data.root={folder}",
                                      f"data.cache_dir={cache}", f"data.image_size={args.size}",
                                      "data.labels_from_folders=false", "device=cpu",
                                      "progress=false", "data.num_workers=2"])
        start = time.perf_counter()
        dataset = build_dataset(cfg.data, "train")
        first = time.perf_counter() - start
        start = time.perf_counter()
        again = build_dataset(cfg.data, "train")
        reopen = time.perf_counter() - start
        cpu = torch.device("cpu")
        cached = epoch_rate(DevicePath(cfg, cpu), again, args.batch_size)
        limit = min(5000, len(dataset))
        cached_workers = epoch_rate(WorkerPath(cfg, cpu), again, args.batch_size, limit)
        files = FileDataset("files", dataset.paths, dataset.targets, None)
        per_file = epoch_rate(WorkerPath(cfg, cpu), files, args.batch_size, limit)
        record = {"benchmark": "folder_decode", **machine(), "images": len(dataset),
                  "size": args.size, "workers": os.cpu_count(),
                  "cache_mb": round(sum(p.stat().st_size for p in cache.iterdir()) / 1e6, 1),
                  "first_decode_s": round(first, 2),
                  "first_decode_images_per_s": round(len(dataset) / first),
                  "reopen_s": round(reopen, 3),
                  "epoch_cached_images_per_s": round(cached),
                  "epoch_cached_workers_images_per_s": round(cached_workers),
                  "epoch_files_images_per_s": round(per_file),
                  "load_average": [round(v, 2) for v in os.getloadavg()],
                  "files_sample": limit, "skipped": len(dataset.skipped),
                  "pixels_checksum": int(np.asarray(again.images[:100], dtype=np.int64).sum())}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
