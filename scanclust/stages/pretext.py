"""Stage 1, pretext: learn features in which an image and its augmentations lie close (SimCLR,
the paper's eq. 1).

For ImageNet the paper starts from MoCo v2 weights instead; ``pretext.method=weights`` loads
such a file into the backbone and ``pretext.method=pretrained`` takes a torchvision or timm
model's own weights; neither trains.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from scanclust.checkpoint import save_checkpoint
from scanclust.config import Config
from scanclust.data import build_dataset
from scanclust.data.pipelines import Augment, Batch, data_path_for
from scanclust.engine import Loop, prepare_model, stage
from scanclust.losses import nt_xent
from scanclust.models import ContrastiveModel, build_contrastive_model
from scanclust.models.saved import load_backbone_weights
from scanclust.rundir import RunDir
from scanclust.runtime import autocast, derive_seed, seed_all

STAGE = "pretext"


def contrastive_body(forward: Callable, augment: Augment, temperature: float,
                     device: torch.device, amp: bool) -> Callable[[Batch], Batch]:
    """The pretext step's body (``scanclust.step``): two SimCLR views, NT-Xent over the global
    batch, gradients."""

    def body(batch: Batch) -> Batch:
        views = augment(batch)
        # One forward pass over both views: batch norm sees the same statistics for each.
        with autocast(device, amp):
            z1, z2 = forward(torch.cat([views["view1"], views["view2"]])).chunk(2)
        loss = nt_xent(z1, z2, temperature, global_batch=True)
        loss.backward()
        return {"loss": loss.detach()}

    return body


class PretextLoop(Loop):
    def state(self) -> dict[str, Any]:
        return {"has_head": True}


@stage(STAGE)
def pretext(cfg: Config, run: RunDir, status: str, device: torch.device) -> dict[str, Any]:
    """Train the pretext model; returns the stage summary (also in ``pretext/summary.json``)."""
    seed_all(derive_seed(cfg.seed, STAGE, "init"))
    model = build_contrastive_model(cfg)
    if cfg.pretext.method != "simclr":
        return _without_training(cfg, run, model)

    pc = cfg.pretext
    dataset = build_dataset(cfg.data, "pretext")
    data = data_path_for(cfg, device, dataset)
    forward = prepare_model(model, cfg, device, train=True, sync_batchnorm=pc.sync_batchnorm)
    augment = data.augment(dataset, {"view1": "simclr", "view2": "simclr"})
    loop = PretextLoop(STAGE, cfg, run, model,
                       contrastive_body(forward, augment, pc.temperature, device, cfg.amp),
                       data, augment, len(dataset), device)
    stats = loop.fit(resume=status == "resume")
    summary = {"seconds": loop.seconds, "epochs": pc.epochs, "final_loss": stats.get("loss"),
               "images_per_s": stats.get("images_per_s"), "data_path": data.name,
               "step": loop.step.mode}
    run.finish(STAGE, summary)
    return summary


def _without_training(cfg: Config, run: RunDir, model: ContrastiveModel) -> dict[str, Any]:
    """A backbone from a weights file (``weights``) or a model library's own weights
    (``pretrained``: torchvision's or timm's caches and downloads); the projection head stays
    random and unused (mining reads the backbone)."""
    start = time.perf_counter()
    if cfg.pretext.method == "weights":
        load_backbone_weights(model.backbone, Path(cfg.pretext.weights))
        source = str(cfg.pretext.weights)
    else:
        from scanclust.models.pretrained import load_pretrained

        load_pretrained(model.backbone, cfg.model.backbone)
        source = f"pretrained:{cfg.model.backbone}"
    save_checkpoint(run.checkpoint(STAGE), STAGE, {
        "model": model.state_dict(), "epoch": 0, "seconds": 0.0, "config": cfg.to_dict(),
        "has_head": False, "weights": source})
    summary = {"seconds": time.perf_counter() - start, "epochs": 0, "weights": source}
    run.finish(STAGE, summary)
    return summary
