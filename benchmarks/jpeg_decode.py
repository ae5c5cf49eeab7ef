"""JPEG input at ImageNet size: images/s of decoding in DataLoader workers (PIL) against
``torchvision.io.decode_jpeg`` on the GPU, each ending in a batch of uint8 images on the device.

Three ways to turn files into a batch on the device, timed over the same files in one run:

- ``pil_resize``: PIL decode, resize (shorter side 256) and 224 centre crop in ``--workers``
  DataLoader workers: the decoding part of the worker path.
- ``pil_simclr``: PIL decode and the whole SimCLR view (random resized crop, flip, colour
  jitter, grayscale) in the workers: what the worker path does per image for ImageNet SCAN.
- ``decode_jpeg``: the workers only read the files' bytes; the main process decodes each batch
  with one ``decode_jpeg`` call on the device (nvJPEG on a GPU, libjpeg-turbo on a CPU) and
  resizes and crops there. On a GPU this is the ``perf.jpeg_decode=device`` option's work.

    python benchmarks/jpeg_decode.py --root /data/imagenet/train --workers 16
    python benchmarks/jpeg_decode.py                  # synthetic 500 x 375 JPEGs (ImageNet's
                                                      # typical size), written to a temp folder
Files are read through the page cache after the first pass; the figure is decode-bound, as a
training run on a local SSD is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, sync  # noqa: E402
from scanclust.config import load_config  # noqa: E402
from scanclust.data.transforms import view_transform  # noqa: E402

SIZE, CROP = 256, 224


def synthetic_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` smooth 500 x 375 colour images with some noise, saved at quality 90 (about the
    size and entropy of an ImageNet photo; pure noise would decode far slower than photos)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (375, 500, 3))
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def encoded_file(path: Path) -> torch.Tensor:
    """A file's bytes as a uint8 tensor in ordinary memory: ``torchvision.io.read_file`` maps
    the file, and such a tensor cannot be sent from a DataLoader worker."""
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


class Files(Dataset):
    def __init__(self, paths: list[Path], mode: str, count: int) -> None:
        self.paths, self.mode, self.count = paths, mode, count
        cfg = load_config("imagenet_50")
        self.simclr = view_transform(cfg, "simclr")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.paths[i % len(self.paths)]
        if self.mode == "decode_jpeg":
            return encoded_file(path)
        with Image.open(path) as im:
            image = im.convert("RGB")
        if self.mode == "pil_simclr":
            return self.simclr(image)
        return TF.pil_to_tensor(TF.center_crop(TF.resize(image, SIZE), CROP))


def device_batch(encoded: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Decode a batch on the device, then resize (shorter side 256) and centre-crop each."""
    images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return torch.stack([TF.center_crop(TF.resize(im, SIZE, antialias=True), CROP)
                        for im in images])


def images_per_second(paths: list[Path], mode: str, args: argparse.Namespace,
                      device: torch.device) -> float:
    count = args.batches * args.batch_size
    loader = DataLoader(Files(paths, mode, count + args.batch_size), batch_size=args.batch_size,
                        num_workers=args.workers, pin_memory=device.type == "cuda",
                        collate_fn=list if mode == "decode_jpeg" else None,
                        persistent_workers=False)
    batches = iter(loader)
    start = 0.0
    for step in range(args.batches + 1):
        batch = next(batches)
        if mode == "decode_jpeg":
            out = device_batch(batch, device)
        else:
            out = batch.to(device, non_blocking=True)
        if step == 0:  # the first batch pays for starting the workers
            sync(device)
            start = time.perf_counter()
    assert out.shape[-2:] == (CROP, CROP)
    sync(device)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="a folder of JPEGs (searched recursively)")
    parser.add_argument("--files", type=int, default=512, help="synthetic files to write")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.root is not None:
            paths = sorted(p for p in args.root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        else:
            paths = synthetic_jpegs(Path(tmp), args.files)
        rates = {mode: images_per_second(paths, mode, args, device)
                 for mode in ("pil_resize", "pil_simclr", "decode_jpeg")}
    print(f"{len(paths)} JPEG files, {args.workers} workers, batch {args.batch_size}, "
          f"decode_jpeg on {device}")
    for mode, rate in rates.items():
        print(f"  {mode:12s} {rate:9.0f} images/s")
    print(json.dumps({"benchmark": "jpeg_decode", **machine(),
                      "params": {k: str(v) for k, v in vars(args).items()},
                      "images_per_s": rates}))


if __name__ == "__main__":
    main()
