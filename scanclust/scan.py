"""Stage 3, SCAN: train a cluster model so that images and their neighbours agree, confidently.

Each step pairs every anchor with one of its K mined neighbours, drawn uniformly, both under
the strong augmentation. After each epoch the SCAN loss of every head is measured on the val
split (eval view, val neighbours); the head and epoch with the lowest loss are kept. No label
is used for that choice.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scanclust.checkpoint import load_checkpoint, save_checkpoint
from scanclust.config import Config, ConfigError, load_config
from scanclust.data import ImageDataset, build_dataset, view_transform
from scanclust.data.loaders import NeighborsDataset, ViewsDataset, make_loader
from scanclust.losses import scan_loss
from scanclust.models import ClusterModel, backbone_state, build_backbone
from scanclust.rundir import RunDir
from scanclust.runtime import autocast, capture_rng, derive_seed, resolve_device, restore_rng, seed_all
from scanclust.training import (build_optimizer, build_scheduler, cpu_state, log, progress,
                                setup_run, to_device)

STAGE = "scan"


def num_clusters(cfg: Config, dataset: ImageDataset) -> int:
    """``model.num_clusters``, else the number of classes; checked against the data size."""
    count = cfg.model.num_clusters
    if count is None:
        if dataset.classes is None:
            raise ConfigError("config key 'model.num_clusters': the data set has no labels, "
                              "so the number of clusters must be given")
        count = len(dataset.classes)
    if count > len(dataset):
        raise ConfigError(f"config key 'model.num_clusters': {count} clusters for only "
                          f"{len(dataset)} images")
    return count


def build_cluster_model(cfg: Config, clusters: int, heads: int) -> ClusterModel:
    return ClusterModel(build_backbone(cfg.model.backbone, cfg.model.width), clusters, heads)


def freeze_backbone(model: ClusterModel) -> None:
    """Fix the backbone's weights and batch-norm statistics (the paper's ImageNet setting)."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.backbone.eval()


def set_train_mode(model: ClusterModel, update_backbone: bool) -> None:
    model.train()
    if not update_backbone:
        model.backbone.eval()


def train_one_epoch(model: ClusterModel, loader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, entropy_weight: float,
                    update_backbone: bool, device: torch.device, amp: bool, show: bool,
                    desc: str) -> dict[str, Any]:
    set_train_mode(model, update_backbone)
    sums = torch.zeros(3, device=device)
    steps = images = 0
    start = time.perf_counter()
    for batch in progress(loader, show, desc):
        batch = to_device(batch, device)
        pair = torch.cat([batch["anchor"], batch["neighbor"]])
        with autocast(device, amp):
            anchor_logits, neighbor_logits = model(pair).chunk(2, dim=1)
        total, consistency, entropy = scan_loss(anchor_logits, neighbor_logits, entropy_weight)
        optimizer.zero_grad(set_to_none=True)
        total.sum().backward()
        optimizer.step()
        scheduler.step()
        sums += torch.stack([total.sum(), consistency.mean(), entropy.mean()]).detach()
        steps += 1
        images += len(batch["anchor"])
    seconds = time.perf_counter() - start
    loss, consistency, entropy = (sums / max(steps, 1)).tolist()
    return {"loss": loss, "consistency": consistency, "entropy": entropy,
            "images_per_s": images / max(seconds, 1e-9), "seconds": seconds}


@torch.no_grad()
def predict_logits(model: ClusterModel, dataset: ImageDataset, transform, batch_size: int,
                   device: torch.device, amp: bool, num_workers: int, show: bool,
                   desc: str = "predict") -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-view logits ``[H, N, C]`` and backbone features ``[N, D]`` of a whole split."""
    model.eval()
    loader = make_loader(ViewsDataset(dataset, {"image": transform}), batch_size, shuffle=False,
                         seed=0, num_workers=num_workers, train=False)
    logits, feats = [], []
    for batch in progress(loader, show, desc):
        images = to_device(batch, device)["image"]
        with autocast(device, amp):
            f = model.backbone(images)
            logits.append(model.forward_heads(f).float().cpu())
        feats.append(f.float().cpu())
    return torch.cat(logits, dim=1), torch.cat(feats)


def heldout_scan_loss(logits: torch.Tensor, neighbors: np.ndarray,
                      entropy_weight: float) -> torch.Tensor:
    """SCAN loss per head over a whole split, each sample against all its K neighbours."""
    h, n, c = logits.shape
    k = neighbors.shape[1]
    index = torch.from_numpy(neighbors).reshape(-1)
    anchors = logits.unsqueeze(2).expand(h, n, k, c).reshape(h, n * k, c)
    total, _, _ = scan_loss(anchors, logits[:, index], 0.0)
    _, _, entropy = scan_loss(logits, logits, 0.0)
    return total - entropy_weight * entropy


def load_neighbors(run: RunDir, split: str, count: int | None) -> np.ndarray | None:
    path = run.neighbors(split)
    if not path.is_file():
        return None
    neighbors = np.load(path)
    return neighbors if count is None else neighbors[:, :count]


def scan(config: Config | str | Path | dict | None = None, out: str | Path = "runs/default", *,
         overrides: list[str] | dict[str, Any] | None = None, resume: bool = False,
         force: bool = False) -> dict[str, Any]:
    """Train the cluster model; returns the stage summary (also in ``scan/summary.json``)."""
    cfg, run = setup_run(config, out, overrides)
    run.require("mine", STAGE)
    status = run.prepare(STAGE, resume, force)
    if status == "done":
        log.info("scan: already done in %s", run.root)
        return run.summary(STAGE)
    sc = cfg.scan
    device = resolve_device(cfg.device)
    train_set = build_dataset(cfg.data, "train")
    val_set = build_dataset(cfg.data, "val")
    clusters = num_clusters(cfg, train_set)
    seed_all(derive_seed(cfg.seed, STAGE, "init"))
    model = build_cluster_model(cfg, clusters, sc.num_heads)
    pretext_state = load_checkpoint(run.checkpoint("pretext"), "pretext")
    model.backbone.load_state_dict(backbone_state(pretext_state["model"]))
    if not sc.update_backbone:
        freeze_backbone(model)
    model.to(device)

    train_neighbors = load_neighbors(run, "train", sc.num_neighbors)
    if len(train_neighbors) != len(train_set):
        raise ConfigError(f"{run.neighbors('train')} has {len(train_neighbors)} rows but the "
                          f"train split has {len(train_set)} images; rerun mine")
    val_neighbors = load_neighbors(run, "val", sc.num_neighbors)
    if val_neighbors is None or val_neighbors.shape[1] == 0:
        val_set, val_neighbors = train_set, load_neighbors(run, "train", None)
    augment = view_transform(cfg, sc.augment)
    eval_view = view_transform(cfg, "eval")
    pairs = NeighborsDataset(train_set, train_neighbors, augment, augment)
    steps_per_epoch = max(len(train_set) // min(sc.batch_size, len(train_set)), 1)
    optimizer = build_optimizer(model.parameters(), sc.optim)
    scheduler = build_scheduler(optimizer, sc.optim, steps_per_epoch * sc.epochs)

    start_epoch, seconds = 0, 0.0
    best: dict[str, Any] = {"loss": float("inf"), "head": 0, "epoch": 0, "model": cpu_state(model)}
    history: list[list[float]] = []
    if status == "resume":
        state = load_checkpoint(run.checkpoint(STAGE), STAGE)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        start_epoch, seconds = state["epoch"], state["seconds"]
        best, history = state["best"], state["history"]
        log.info("scan: resuming at epoch %d/%d", start_epoch, sc.epochs)

    for epoch in range(start_epoch, sc.epochs):
        seed_all(derive_seed(cfg.seed, STAGE, epoch))
        loader = make_loader(pairs, sc.batch_size, shuffle=True,
                             seed=derive_seed(cfg.seed, STAGE, "order", epoch),
                             num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
        stats = train_one_epoch(model, loader, optimizer, scheduler, sc.entropy_weight,
                                sc.update_backbone, device, cfg.amp, cfg.progress,
                                f"scan {epoch + 1}/{sc.epochs}")
        seconds += stats["seconds"]
        logits, _ = predict_logits(model, val_set, eval_view, cfg.evaluate.batch_size, device,
                                   cfg.amp, cfg.data.num_workers, False)
        val_loss = heldout_scan_loss(logits, val_neighbors, sc.entropy_weight)
        history.append(val_loss.tolist())
        head = int(val_loss.argmin())
        if float(val_loss[head]) < best["loss"]:
            best = {"loss": float(val_loss[head]), "head": head, "epoch": epoch + 1,
                    "model": cpu_state(model)}
        run.log(STAGE, epoch=epoch + 1, lr=scheduler.get_last_lr()[0], val_loss=val_loss.tolist(),
                best_head=best["head"], best_epoch=best["epoch"], **stats)
        log.info("scan epoch %d/%d  loss %.4f  val loss %.4f (head %d)  %.0f img/s", epoch + 1,
                 sc.epochs, stats["loss"], float(val_loss[head]), head, stats["images_per_s"])
        save_checkpoint(run.checkpoint(STAGE), STAGE, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "rng": capture_rng(),
            "seconds": seconds, "best": best, "history": history, "config": cfg.to_dict(),
            "num_clusters": clusters, "num_heads": sc.num_heads})
    if sc.epochs == 0:
        save_checkpoint(run.checkpoint(STAGE), STAGE, {
            "model": model.state_dict(), "epoch": 0, "seconds": 0.0, "best": best,
            "history": [], "config": cfg.to_dict(), "num_clusters": clusters,
            "num_heads": sc.num_heads})
    summary = {"seconds": seconds, "epochs": sc.epochs, "best_head": best["head"],
               "best_epoch": best["epoch"], "best_loss": best["loss"],
               "num_clusters": clusters}
    run.finish(STAGE, summary)
    return summary


def load_scan_model(run: RunDir) -> tuple[ClusterModel, dict[str, Any]]:
    """The kept cluster model of a finished SCAN stage, reduced to its best head.

    The network is built from the config saved in the checkpoint, not the current one, so a
    later change of ``model.*`` cannot mismatch the weights.
    """
    state = load_checkpoint(run.checkpoint(STAGE), STAGE)
    model = build_cluster_model(load_config(state["config"]), state["num_clusters"],
                                state["num_heads"])
    model.load_state_dict(state["best"]["model"])
    model.keep_head(state["best"]["head"])
    return model, state
