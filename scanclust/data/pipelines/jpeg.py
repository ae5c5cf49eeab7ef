"""The decode path: JPEG files decoded on the device, a batch at a time.

For a folder too large to hold on the device (ImageNet), the worker path decodes and augments
every image with PIL in DataLoader workers, and a GPU waits for CPUs that cannot keep up. Here
the workers only read each file's bytes; the main process decodes the whole batch with one
``torchvision.io.decode_jpeg`` call on the device (nvJPEG on a GPU), resizes the shorter side to
``data.resize`` (or ``data.image_size``) and centre-crops it square, as the device path stores
images, and augments the batch there (``batch_augment``). ``benchmarks/jpeg_decode.py`` measures
whether that pays on a given machine; choose it with ``perf.data_path=decode``.

A SCAN partner is drawn in the worker (its file must be read too), uniformly over the sample's
neighbours as on the other paths, from the sample's own seed (``SeededSampler``). Files that
``decode_jpeg`` refuses (a PNG named .JPEG, CMYK) are decoded one by one on the host instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from scanclust.config import ConfigError
from scanclust.data.datasets import FileDataset, ImageDataset
from scanclust.data.pipelines.base import PARTNER, Augment, Batch, Batches
from scanclust.data.pipelines.device import DevicePath, by_kind
from scanclust.data.pipelines.workers import worker_loader
from scanclust.runtime import channels_last


def encoded_file(path: Path) -> torch.Tensor:
    """A file's bytes as a uint8 tensor in ordinary memory (``torchvision.io.read_file`` maps the
    file, and a DataLoader worker cannot send such a tensor)."""
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


class EncodedFiles(Dataset):
    """A file data set's items as bytes: ``{"index", "jpeg"}`` and, with ``neighbors``, a drawn
    partner's ``{"neighbor_index", "neighbor_jpeg"}``. Items are asked for as (index, seed)."""

    def __init__(self, base: FileDataset, neighbors: np.ndarray | None) -> None:
        self.base, self.neighbors = base, neighbors

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        item: dict[str, Any] = {"index": index, "jpeg": encoded_file(self.base.paths[index])}
        if self.neighbors is not None:
            k = self.neighbors.shape[1]  # K = 0 pairs the sample with itself
            generator = torch.Generator().manual_seed(seed)
            other = int(self.neighbors[index, torch.randint(k, (), generator=generator)]) if k \
                else index
            item["neighbor_index"] = other
            item["neighbor_jpeg"] = encoded_file(self.base.paths[other])
        return item


def collate_encoded(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Indices as tensors, the files' bytes as lists (they differ in length)."""
    values = {key: [item[key] for item in items] for key in items[0]}
    return {key: torch.tensor(v) if key.endswith("index") else v for key, v in values.items()}


class DecodeAugment(Augment):
    """The device path's augmentation (``DeviceAugment``) of a batch decoded from its bytes."""

    # Decoding works on lists of variable-length inputs: no CUDA graph can hold it.
    on_device = False

    def __init__(self, path: DecodePath, dataset: FileDataset, views: dict[str, str],
                 neighbors: np.ndarray | None, generator: torch.Generator | None,
                 training: bool) -> None:
        self.path, self.dataset, self.neighbors = path, dataset, neighbors
        self.targets = torch.from_numpy(dataset.targets).to(path.device)
        self.generator = generator
        self.nhwc = channels_last(path.cfg, path.device, training)
        self.groups = by_kind(views)
        self.loaders: dict[tuple, DataLoader] = {}  # kept for their persistent workers

    def __call__(self, batch: Batch) -> Batch:
        index = batch["index"].to(self.path.device)
        out = {"index": index, "label": self.targets[index]}
        images = {"": self.path.decode(batch["jpeg"])}
        if "neighbor_jpeg" in batch:
            out["neighbor_index"] = batch["neighbor_index"].to(self.path.device)
            images[PARTNER] = self.path.decode(batch["neighbor_jpeg"])
        return self.path.add_views(out, self.groups, lambda name: images.get(name, images[""]),
                                   lambda x: x, self.generator, self.nhwc)


class DecodePath(DevicePath):
    """Files read as bytes in DataLoader workers, decoded and augmented on the device."""

    name = "decode"

    def augment(self, dataset: ImageDataset, views: dict[str, str],
                neighbors: np.ndarray | None = None,
                generator: torch.Generator | None = None,
                training: bool = True) -> DecodeAugment:
        if not isinstance(dataset, FileDataset):
            raise ConfigError(f"config key 'perf.data_path': decode reads image files, but "
                              f"{dataset.name} is held in memory; use device or workers")
        return DecodeAugment(self, dataset, views, neighbors, generator, training)

    def batches(self, augment: DecodeAugment, batch_size: int, *, shuffle: bool, seed: int,
                train: bool, shard: bool = False) -> Batches:
        key = (batch_size, shuffle, train, shard)
        if key not in augment.loaders:
            files = EncodedFiles(augment.dataset, augment.neighbors)
            augment.loaders[key] = worker_loader(files, self.cfg, self.device, batch_size,
                                                 shuffle=shuffle, train=train, shard=shard,
                                                 collate=collate_encoded)
        loader = augment.loaders[key]
        loader.sampler.set_seed(seed)
        return Batches(iter(loader), len(loader))

    def decode(self, encoded: list[torch.Tensor]) -> torch.Tensor:
        """uint8 [B, 3, S, S] on the device: decoded, shorter side resized to S, centre-cropped."""
        size = self.cfg.data.resize or self.cfg.data.image_size
        try:
            images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            images = [decode_image(e, mode=ImageReadMode.RGB).to(self.device) for e in encoded]
        return torch.stack([image if image.shape[1:] == (size, size) else
                            TF.center_crop(TF.resize(image, [size], antialias=True), [size, size])
                            for image in images])

