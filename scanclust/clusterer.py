"""Apply a trained run to new images: ``load(run_dir).predict(images)`` and ``scanclust predict``.

New images are read and sized exactly as a folder run's training images were (``open_image``,
shorter side to ``data.resize`` or ``data.image_size``, centre square), then given the eval
view, so a file predicted here gets the cluster it would have got inside the run.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from scanclust.config import Config, load_config
from scanclust.data import batch_augment as B
from scanclust.data.decoding import iter_decoded
from scanclust.data.images import (ImageReadError, decode_square, escape_name, list_images,
                                   resize_square, to_rgb)
from scanclust.errors import UserError
from scanclust.labels import cluster_names
from scanclust.models import ClusterModel
from scanclust.files import csv_text, write_csv
from scanclust.rundir import RunDir
from scanclust.runtime import autocast, resolve_device
from scanclust.checkpoint import CheckpointError
from scanclust.models.saved import CLUSTER_STAGES, final_stage, load_cluster_model

log = logging.getLogger("scanclust")
ImageInput = Union[str, Path, Image.Image, np.ndarray]
ACCEPTED = ("an image path (str or Path), a PIL image, a numpy uint8 array (H x W x 3, "
            "H x W or N x H x W x 3), or a list, tuple or generator of paths, PIL images "
            "and arrays")


class PredictError(UserError, ValueError):
    """An image that cannot be read; the message names it."""


@dataclass
class Clusterer:
    """A trained cluster model with the eval view it was trained for."""

    model: ClusterModel
    config: Config
    device: torch.device
    stage: str

    @property
    def size(self) -> int:
        """Side of the square images are decoded to (the training images' stored size)."""
        return self.config.data.resize or self.config.data.image_size

    @torch.no_grad()
    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, C]`` of ``[N, size, size, 3]`` uint8 arrays."""
        d = self.config.data
        self.model.eval()
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.device)
        with autocast(self.device, self.config.amp):
            logits = self.model(B.eval_batch(x, d.image_size, d.mean, d.std))[0]
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def predict(self, images: ImageInput | Iterable[ImageInput],
                batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Cluster ids ``[N]`` and probabilities ``[N, C]``, in input order.

        Takes one image or many (see ``ACCEPTED``); anything else is a TypeError. A file that
        cannot be read is a one-line ``PredictError`` naming it (``scanclust predict`` skips
        such files instead).
        """
        probs = []
        batch: list[np.ndarray] = []
        for i, item in enumerate(_items(images)):
            batch.append(self._square(item, i))
            if len(batch) == batch_size:
                probs.append(self.predict_arrays(np.stack(batch)))
                batch = []
        if batch:
            probs.append(self.predict_arrays(np.stack(batch)))
        p = np.concatenate(probs) if probs else np.zeros((0, self.model.num_clusters), np.float32)
        return p.argmax(1), p

    def _square(self, item: ImageInput, position: int) -> np.ndarray:
        try:
            if isinstance(item, (str, Path)):
                return decode_square(item, self.size)
            image = item if isinstance(item, Image.Image) else Image.fromarray(
                item if item.ndim == 2 or item.shape[2] != 1 else item[..., 0])
            return resize_square(to_rgb(image), self.size)
        except ImageReadError as err:
            raise PredictError(f"cannot read {_describe(item, position)}: {err}") from None


def _describe(item: ImageInput, position: int) -> str:
    """A path by its name; an image in memory by its place among the inputs and its shape."""
    if isinstance(item, (str, Path)):
        return f"image {escape_name(item)}"
    if isinstance(item, np.ndarray):
        return f"item {position} (a numpy array of shape {item.shape})"
    return f"item {position} (a PIL image of {item.size[0]}x{item.size[1]} pixels)"


def _items(images: Any) -> Iterator[ImageInput]:
    """One image or an iterable of them, checked item by item."""
    if _is_image(images):
        yield images
        return
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] in (1, 3, 4):
            yield from images
            return
        raise TypeError(f"predict got a numpy array of dtype {images.dtype} and shape "
                        f"{images.shape}; it takes {ACCEPTED}")
    if isinstance(images, (bytes, dict)) or not isinstance(images, Iterable):
        raise TypeError(f"predict got {type(images).__name__}; it takes {ACCEPTED}")
    if isinstance(images, (list, tuple)):  # checked before any work; a generator as it comes
        for i, item in enumerate(images):
            if not _is_image(item):
                raise TypeError(f"predict got {type(item).__name__} as item {i}; it takes "
                                f"{ACCEPTED}")
    for i, item in enumerate(images):
        if not _is_image(item):
            raise TypeError(f"predict got {type(item).__name__} as item {i}; it takes "
                            f"{ACCEPTED}")
        yield item


def _is_image(item: Any) -> bool:
    return isinstance(item, (str, Path, Image.Image)) or (
        isinstance(item, np.ndarray) and item.dtype == np.uint8
        and (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3, 4))))


def load(run_dir: str | Path, stage: str | None = None, device: str = "auto") -> Clusterer:
    """The run's final model: self-label if it finished, else SCAN (or the named ``stage``).

    The stage is verified as ``evaluate`` verifies it (``RunDir.verify``): a checkpoint copied
    in from another run, or built on a redone pretext, is refused. The training images are not
    compared: a model may assign new images where its training folder is not at hand.
    """
    run = RunDir(run_dir)
    if stage is None:
        stage = final_stage(run)
    if stage not in CLUSTER_STAGES or not run.is_done(stage):
        raise CheckpointError(f"{run.root} has no finished {stage} stage to load")
    run.verify(stage)
    model, state = load_cluster_model(run, stage)
    cfg = load_config(state["config"], {"device": device})
    torch_device = resolve_device(cfg.device)
    return Clusterer(model.to(torch_device).eval(), cfg, torch_device, stage)


def predict(run_dir: str | Path, images: ImageInput | Iterable[ImageInput],
            device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """One-call form of ``load(run_dir).predict(images)``."""
    return load(run_dir, device=device).predict(images)


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given, folders as their images (recursively, ``list_images``); the rest, and
    what a folder holds that cannot be read, as (path, reason)."""
    paths: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            try:
                listing = list_images(path)
            except ImageReadError as err:
                skipped.append((name, str(err)))
                continue
            paths += listing.paths
            skipped += [(str(p), reason) for p, reason in listing.skipped]
        elif path.is_file():
            paths.append(path)
        else:
            skipped.append((name, "does not exist" if not path.is_symlink() else
                            "broken symlink or symlink loop"))
    return paths, skipped


def predict_command(run_dir: str, inputs: list[str], csv_path: str | None = None,
                    device: str = "auto", batch_size: int = 256, strict: bool = False) -> int:
    """``scanclust predict``: CSV rows ``path, cluster, confidence``; unreadable files are
    skipped with a warning (or stop the command with ``strict``).

    Paths are written as ``escape_name`` gives them. A ``csv_path`` is replaced only once the
    new CSV is complete, so a failure leaves an earlier file as it was.
    """
    if batch_size < 1:
        raise PredictError("--batch-size must be >= 1")
    paths, skipped = expand_inputs(inputs)
    if strict and skipped:
        raise PredictError(f"cannot read image {escape_name(skipped[0][0])}: {skipped[0][1]} "
                           f"(--strict)")
    names = cluster_names(run_dir)  # a reviewed run's names: a label column
    clusterer = load(run_dir, device=device)
    rows: list[tuple[str, int, float]] = []
    done = 0
    for arrays, failures in iter_decoded(paths, clusterer.size, batch_size):
        batch_paths = paths[done:done + len(arrays)]
        done += len(arrays)
        for i, reason in sorted(failures.items()):
            if strict:
                raise PredictError(f"cannot read image {escape_name(batch_paths[i])}: {reason} "
                                   f"(--strict)")
            skipped.append((str(batch_paths[i]), reason))
        good = [i for i in range(len(arrays)) if i not in failures]
        if not good:
            continue
        probs = clusterer.predict_arrays(arrays[good])
        rows += [(escape_name(batch_paths[i]), int(p.argmax()), float(p.max()))
                 for i, p in zip(good, probs)]
    for name, reason in skipped:
        log.warning("skipped %s: %s", escape_name(name), escape_name(reason))
    if not rows:
        raise PredictError(f"no readable image among the {len(inputs)} inputs "
                           f"({len(skipped)} skipped)")
    table = [["path", "cluster", "confidence"] + (["label"] if names else [])] + [
        [name, cluster, f"{confidence:.6f}"] + ([names[cluster]] if names else [])
        for name, cluster, confidence in rows]
    if csv_path:
        write_csv(Path(csv_path), table, PredictError)
    else:
        sys.stdout.write(csv_text(table))
    log.info("predict: %d images assigned with the %s model of %s, %d skipped%s", len(rows),
             clusterer.stage, escape_name(run_dir), len(skipped),
             f"; wrote {escape_name(csv_path)}" if csv_path else "")
    return 0
