"""Apply a trained run to new images: ``load(run_dir).predict(images)``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from scanclust.checkpoint import CheckpointError
from scanclust.config import Config, load_config
from scanclust.data import view_transform
from scanclust.models import ClusterModel
from scanclust.rundir import RunDir
from scanclust.runtime import autocast, resolve_device
from scanclust.scan import load_scan_model
from scanclust.selflabel import load_selflabel_model


@dataclass
class Clusterer:
    """A trained cluster model with the eval transform it was trained for."""

    model: ClusterModel
    config: Config
    device: torch.device
    stage: str

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image | str | Path],
                batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Cluster ids ``[N]`` and probabilities ``[N, C]`` for PIL images or image paths."""
        transform = view_transform(self.config, "eval")
        self.model.eval()
        probs = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(_open(im)) for im in images[start:start + batch_size]])
            with autocast(self.device, self.config.amp):
                logits = self.model(batch.to(self.device))[0]
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
        p = torch.cat(probs).numpy() if probs else np.zeros((0, self.model.num_clusters))
        return p.argmax(1), p


def _open(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except OSError as err:
        raise ValueError(f"cannot read image {image}: {err}") from None


def load(run_dir: str | Path, stage: str | None = None, device: str = "auto") -> Clusterer:
    """The run's final model: self-label if it finished, else SCAN (or the named ``stage``)."""
    run = RunDir(run_dir)
    if stage is None:
        stage = "selflabel" if run.is_done("selflabel") else "scan"
    if stage not in ("scan", "selflabel") or not run.is_done(stage):
        raise CheckpointError(f"{run.root} has no finished {stage} stage to load")
    model, state = (load_selflabel_model if stage == "selflabel" else load_scan_model)(run)
    cfg = load_config(state["config"], {"device": device})
    torch_device = resolve_device(cfg.device)
    return Clusterer(model.to(torch_device).eval(), cfg, torch_device, stage)


def predict(run_dir: str | Path, images: Sequence[Image.Image | str | Path],
            device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """One-call form of ``load(run_dir).predict(images)``."""
    return load(run_dir, device=device).predict(images)
