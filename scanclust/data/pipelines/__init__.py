"""Data paths: how a stage gets its batches of augmented views.

A stage asks a data path for two things, once per stage and once per epoch:

- ``augment(dataset, views, neighbors)``: a callable that turns one batch, as the path yields
  it, into named views on the device (``{"view1": "simclr", "view2": "simclr"}`` for the
  pretext; ``{"anchor": kind, "neighbor": kind}`` with the mined ``neighbors`` for SCAN, where
  the ``neighbor`` view shows a partner drawn per sample; ``{"weak": "eval", "strong": kind}``
  for self-label). It depends on nothing that changes between epochs, so a training step that
  calls it can be captured once as a CUDA graph and replayed (``scanclust.step``).
- ``batches(augment, batch_size, shuffle=, seed=, train=, shard=)``: an epoch's batches for
  it. Under torchrun a training batch is this process's share of the global batch of
  ``batch_size`` (``distributed.local_batch``); with ``shard`` (inference) each process gets its
  own part of the data set (``distributed.shard_indices``) to gather afterwards.

Four interchangeable paths implement this, one module each:

- ``WorkerPath`` (``workers.py``): per-sample torchvision transforms in DataLoader workers;
  batches carry the finished views and ``augment`` only moves them to the device. Works for
  any data set, including ImageNet-size folders that do not fit in memory.
- ``DevicePath`` (``device.py``): the whole data set held on the device as one uint8 tensor.
  Batches are index tensors; ``augment`` gathers the images and augments them a batch at a time
  (``batch_augment``), every sample with its own parameters, with one call per view kind (the
  two SimCLR views, or a SCAN anchor and its partner, are one call on twice the batch). No
  decoding, no worker processes, no host-to-device copies, no host synchronisation.
- ``DecodePath`` (``jpeg.py``): image files read by DataLoader workers as bytes, decoded on
  the device a batch at a time, then augmented as on the device path.
- ``FeaturePath`` (``features.py``): with a frozen backbone, its features of a few views of
  every image, computed once and served as the views (cached-feature mode).

Training steps draw their random numbers from the device's default generator, which the stages
reseed every epoch; ``views`` (inference, cached features, tests) seeds a generator of its own.
``data_path_for`` picks a path from ``perf.data_path`` (``auto`` takes the device path when the
data set fits under ``perf.device_data_gb``).
"""

from __future__ import annotations

import torch

from scanclust.config import Config
from scanclust.data.datasets import ImageDataset
from scanclust.data.pipelines.base import (PARTNER, Augment, Batch, Batches, DataPath,
                                           draw_partners, index_batches, layout, num_batches,
                                           to_device)
from scanclust.data.pipelines.device import DevicePath
from scanclust.data.pipelines.features import FeaturePath, feature_store
from scanclust.data.pipelines.jpeg import DecodePath
from scanclust.data.pipelines.workers import WorkerPath

__all__ = ["PARTNER", "Augment", "Batch", "Batches", "DataPath", "DecodePath", "DevicePath",
           "FeaturePath", "WorkerPath", "data_path_for", "draw_partners",
           "feature_store", "fits_on_device", "index_batches", "layout", "num_batches",
           "to_device"]


def fits_on_device(cfg: Config, dataset: ImageDataset) -> bool:
    """Whether ``auto`` should hold this data set on the device: its uint8 images at the stored
    size (``data.resize`` or ``data.image_size``) take at most ``perf.device_data_gb``."""
    size = cfg.data.resize or cfg.data.image_size
    return len(dataset) * 3 * size * size <= cfg.perf.device_data_gb * 1e9


def data_path_for(cfg: Config, device: torch.device, dataset: ImageDataset) -> DataPath:
    """The data path ``perf.data_path`` names for ``dataset`` on ``device``."""
    choice = cfg.perf.data_path
    if choice == "auto":
        choice = "device" if fits_on_device(cfg, dataset) else "workers"
    return {"decode": DecodePath, "device": DevicePath}.get(choice, WorkerPath)(cfg, device)

