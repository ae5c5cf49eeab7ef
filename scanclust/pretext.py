"""Stage 1, pretext: learn features in which an image and its augmentations lie close (SimCLR).

For ImageNet the paper starts from MoCo v2 weights instead; ``pretext.method=weights`` loads
such a file into the backbone and trains nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from scanclust import distributed
from scanclust.checkpoint import (CheckpointError, load_checkpoint, load_state, read_tensors,
                                  save_checkpoint)
from scanclust.config import Config
from scanclust.data import build_dataset
from scanclust.data.paths import Augment, Batch, Batches, data_path_for, num_batches
from scanclust.health import check_finite
from scanclust.losses import nt_xent
from scanclust.models import ContrastiveModel, build_backbone
from scanclust.rundir import exclusive
from scanclust.runtime import autocast, capture_rng, derive_seed, resolve_device, restore_rng, seed_all
from scanclust.step import TrainStep
from scanclust.training import (build_optimizer, build_scheduler, checkpoint_due, log,
                                prepare_model, progress, begin_stage)

STAGE = "pretext"


def build_contrastive_model(cfg: Config) -> ContrastiveModel:
    backbone = build_backbone(cfg.model.backbone, cfg.model.width)
    return ContrastiveModel(backbone, cfg.model.proj_hidden, cfg.model.proj_dim)


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


def train_one_epoch(model: nn.Module, step: TrainStep, batches: Batches,
                    optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
                    show: bool, desc: str) -> dict[str, float]:
    model.train()
    total = torch.zeros((), device=device)
    steps = images = 0
    start = time.perf_counter()
    for batch in progress(batches, show, desc):
        out = step(batch)
        optimizer.step()
        scheduler.step()
        total += out["loss"]
        steps += 1
        images += len(batch["index"])
    mean_loss = float(distributed.mean_over_processes(total)) / max(steps, 1)  # one host sync
    seconds = time.perf_counter() - start
    images *= distributed.world_size()
    return {"loss": mean_loss, "images_per_s": images / max(seconds, 1e-9), "seconds": seconds}


@exclusive
def pretext(config: Config | str | Path | dict | None = None, out: str | Path = "runs/default", *,
            overrides: list[str] | dict[str, Any] | None = None, resume: bool = False,
            force: bool = False) -> dict[str, Any]:
    """Train the pretext model; returns the stage summary (also in ``pretext/summary.json``)."""
    cfg, run, status = begin_stage(STAGE, config, out, overrides, resume, force)
    if status == "done":
        return run.summary(STAGE)
    device = resolve_device(cfg.device)
    seed_all(derive_seed(cfg.seed, STAGE, "init"))
    model = build_contrastive_model(cfg)
    if cfg.pretext.method == "weights":
        return _from_weights(cfg, run, model)
    if cfg.pretext.method == "pretrained":
        return _from_library(cfg, run, model)

    dataset = build_dataset(cfg.data, "pretext")
    pc = cfg.pretext
    data = data_path_for(cfg, device, dataset)
    forward = prepare_model(model, cfg, device, train=True, sync_batchnorm=pc.sync_batchnorm)
    steps_per_epoch = num_batches(len(dataset), pc.batch_size, True)[1]
    optimizer = build_optimizer(model.parameters(), pc.optim, cfg.perf.optimizer_impl)
    scheduler = build_scheduler(optimizer, pc.optim, steps_per_epoch * pc.epochs)
    start_epoch, seconds = 0, 0.0
    if status == "resume":
        state = load_checkpoint(run.checkpoint(STAGE), STAGE)
        distributed.check_resume(state, STAGE)
        load_state(model, state["model"], run.checkpoint(STAGE))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        start_epoch, seconds = state["epoch"], state["seconds"]
        log.info("pretext: resuming at epoch %d/%d", start_epoch, pc.epochs)

    augment = data.augment(dataset, {"view1": "simclr", "view2": "simclr"})
    step = TrainStep(contrastive_body(forward, augment, pc.temperature, device, cfg.amp),
                     model.parameters(), device, cfg.perf.cuda_graphs and augment.on_device)
    stats: dict[str, float] = {}
    for epoch in range(start_epoch, pc.epochs):
        seed_all(derive_seed(cfg.seed, STAGE, epoch))
        batches = data.batches(augment, pc.batch_size, shuffle=True,
                               seed=derive_seed(cfg.seed, STAGE, "order", epoch), train=True)
        stats = train_one_epoch(model, step, batches, optimizer, scheduler, device, cfg.progress,
                                f"pretext {epoch + 1}/{pc.epochs}")
        check_finite(stats, STAGE, epoch + 1, cfg, model)
        seconds += stats["seconds"]
        run.log(STAGE, epoch=epoch + 1, lr=scheduler.get_last_lr()[0], **stats)
        log.info("pretext epoch %d/%d  loss %.4f  %.0f img/s (%s data path, %s step)",
                 epoch + 1, pc.epochs, stats["loss"], stats["images_per_s"], data.name, step.mode)
        if checkpoint_due(epoch + 1, epoch + 1 == pc.epochs, cfg.checkpoint_every):
            save_checkpoint(run.checkpoint(STAGE), STAGE, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "rng": capture_rng(),
                "seconds": seconds, "config": cfg.to_dict(), "has_head": True})
    if pc.epochs == 0:
        save_checkpoint(run.checkpoint(STAGE), STAGE, {
            "model": model.state_dict(), "epoch": 0, "seconds": 0.0, "config": cfg.to_dict(),
            "has_head": True})
    summary = {"seconds": seconds, "epochs": pc.epochs, "final_loss": stats.get("loss"),
               "images_per_s": stats.get("images_per_s"), "data_path": data.name,
               "step": step.mode}
    run.finish(STAGE, summary)
    return summary


def _from_weights(cfg: Config, run, model: ContrastiveModel) -> dict[str, Any]:
    start = time.perf_counter()
    load_backbone_weights(model.backbone, Path(cfg.pretext.weights))
    save_checkpoint(run.checkpoint(STAGE), STAGE, {
        "model": model.state_dict(), "epoch": 0, "seconds": 0.0, "config": cfg.to_dict(),
        "has_head": False, "weights": str(cfg.pretext.weights)})
    summary = {"seconds": time.perf_counter() - start, "epochs": 0, "weights": cfg.pretext.weights}
    run.finish(STAGE, summary)
    return summary


def _from_library(cfg: Config, run, model: ContrastiveModel) -> dict[str, Any]:
    """The backbone's pretrained weights from torchvision or timm (their caches, their
    downloads); the projection head stays random and unused (mining reads the backbone)."""
    from scanclust.models.pretrained import load_pretrained

    start = time.perf_counter()
    load_pretrained(model.backbone, cfg.model.backbone)
    save_checkpoint(run.checkpoint(STAGE), STAGE, {
        "model": model.state_dict(), "epoch": 0, "seconds": 0.0, "config": cfg.to_dict(),
        "has_head": False, "weights": f"pretrained:{cfg.model.backbone}"})
    summary = {"seconds": time.perf_counter() - start, "epochs": 0,
               "weights": f"pretrained:{cfg.model.backbone}"}
    run.finish(STAGE, summary)
    return summary


_PREFIXES = ("module.", "encoder_q.", "encoder.", "backbone.", "model.")


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Load a foreign backbone checkpoint (MoCo v2, torchvision, ...) by stripping key prefixes.

    MoCo stores ``module.encoder_q.conv1.weight``; torchvision ``conv1.weight``. Classifier and
    projection layers are dropped; a backbone key left unfilled is an error naming it, since a
    half-loaded backbone would cluster noise without complaint.
    """
    if not path.is_file():
        raise CheckpointError(f"pretext.weights={path} does not exist")
    if path.suffix == ".safetensors":  # the Hugging Face hub's format (timm models)
        from safetensors.torch import load_file

        try:
            payload = load_file(path)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"cannot read pretext.weights={path}: "
                                  f"{str(err).splitlines()[0]}") from None
    else:
        payload = read_tensors(path, f"pretext.weights={path}",
                               "; is it a PyTorch weights file (.pt, .pth)?")
    for key in ("state_dict", "model"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    state = {}
    for key, value in payload.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        state[key] = value
    wanted = backbone.state_dict()
    found = {k: v for k, v in state.items() if k in wanted}
    load_state(backbone, found, f"pretext.weights={path}",
               "; are they weights for another backbone than model.backbone?")
