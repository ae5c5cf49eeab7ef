"""Stage 3, SCAN: train a cluster model so that images and their neighbours agree, confidently.

Each step pairs every anchor with a partner drawn uniformly among its K mined neighbours and,
as the authors' released code does (``scan.partner``), the image itself; both under the strong
augmentation. After each epoch a label-free selection loss of every head is measured on the val
split (eval view, val neighbours; ``selection_loss``); the head and epoch with the lowest loss
are kept.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from scanclust import distributed
from scanclust.checkpoint import load_checkpoint, load_state, save_checkpoint
from scanclust.config import Config, ConfigError, ScanConfig, load_config
from scanclust.cached import FeaturePath, cache_features, feature_store
from scanclust.data import ImageDataset, build_dataset
from scanclust.data.paths import (Augment, Batch, Batches, DataPath, data_path_for, num_batches,
                                  to_device)
from scanclust.health import check_finite, collapse_warning
from scanclust.losses import EPS, scan_loss
from scanclust.models import ClusterModel, Heads, backbone_state, build_backbone
from scanclust.preflight import num_clusters
from scanclust.rundir import RunDir, exclusive
from scanclust.runtime import (autocast, capture_rng, channels_last, derive_seed, resolve_device,
                               restore_rng, seed_all)
from scanclust.step import TrainStep
from scanclust.training import (build_optimizer, build_scheduler, checkpoint_due, cpu_state, log,
                                prepare_model, progress, begin_stage)

STAGE = "scan"


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


def scan_body(forward: Callable, augment: Augment, entropy_weight: float, device: torch.device,
              amp: bool) -> Callable[[Batch], Batch]:
    """The SCAN step's body (``scanclust.step``): anchors and partners through ``forward`` (the
    model on images, or its heads on cached features) in one pass, SCAN loss (entropy of the
    global batch's mean prediction), gradients."""

    def body(batch: Batch) -> Batch:
        views = augment(batch)
        with autocast(device, amp):
            logits = forward(torch.cat([views["anchor"], views["neighbor"]]))
        anchor_logits, neighbor_logits = logits.chunk(2, dim=1)
        total, consistency, entropy = scan_loss(anchor_logits, neighbor_logits, entropy_weight,
                                                global_batch=True)
        total.sum().backward()
        return {"loss": torch.stack([total.sum(), consistency.mean(), entropy.mean()]).detach()}

    return body


def train_one_epoch(model: ClusterModel, step: TrainStep, batches: Batches,
                    optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, update_backbone: bool,
                    device: torch.device, show: bool, desc: str) -> dict[str, Any]:
    """One epoch of SCAN; returns the mean loss terms, images/s and seconds."""
    set_train_mode(model, update_backbone)
    sums = torch.zeros(3, device=device)
    steps = images = 0
    start = time.perf_counter()
    for batch in progress(batches, show, desc):
        out = step(batch)
        optimizer.step()
        scheduler.step()
        sums += out["loss"]
        steps += 1
        images += len(batch["index"])
    sums = distributed.mean_over_processes(sums)
    loss, consistency, entropy = (sums / max(steps, 1)).tolist()  # the epoch's only host sync
    seconds = time.perf_counter() - start
    images *= distributed.world_size()
    return {"loss": loss, "consistency": consistency, "entropy": entropy,
            "images_per_s": images / max(seconds, 1e-9), "seconds": seconds}


@torch.no_grad()
def predict_logits(model: ClusterModel, data: DataPath, dataset: ImageDataset,
                   batch_size: int, device: torch.device, amp: bool, channels_last: bool,
                   show: bool, desc: str = "predict") -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-view logits ``[H, N, C]`` and backbone features ``[N, D]`` of a whole split (under
    torchrun each process predicts its shard, and all receive the whole split)."""
    model.eval()
    batches = data.views(dataset, {"image": "eval"}, batch_size, shuffle=False, seed=0,
                         train=False, shard=True)
    logits, feats = [], []
    for batch in progress(batches, show, desc):
        images = to_device(batch, device, channels_last)["image"]
        with autocast(device, amp):
            f = model.backbone(images)
            logits.append(model.forward_heads(f).float().cpu())
        feats.append(f.float().cpu())
    n = len(dataset)
    logits_by_sample = distributed.gather_rows(torch.cat(logits, dim=1).transpose(0, 1), n)
    return logits_by_sample.transpose(0, 1), distributed.gather_rows(torch.cat(feats), n)


def heldout_scan_loss(logits: torch.Tensor, neighbors: np.ndarray, entropy_weight: float,
                      chunk: int = 1024) -> torch.Tensor:
    """SCAN loss per head over a whole split, each sample against all its neighbours.

    Anchors are taken ``chunk`` at a time so memory stays ``H x chunk x K x C`` (ImageNet val
    with 10 heads, K = 50 and 1000 clusters would need 100 GB at once).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    table = torch.from_numpy(np.ascontiguousarray(neighbors))
    n, k = table.shape
    log_sims = torch.zeros(probs.shape[0])
    for start in range(0, n, chunk):
        rows = table[start:start + chunk]
        anchor = probs[:, start:start + chunk].unsqueeze(2)  # [H, c, 1, C]
        sims = (anchor * probs[:, rows]).sum(-1)  # [H, c, K]
        log_sims += torch.log(sims.clamp_min(EPS)).sum(dim=(1, 2))
    consistency = -log_sims / (n * k)
    _, _, entropy = scan_loss(logits, logits, 0.0)
    return consistency - entropy_weight * entropy


def with_self(neighbors: np.ndarray) -> np.ndarray:
    """Prepend each row's own index: [N, K] -> [N, K + 1]."""
    own = np.arange(len(neighbors), dtype=neighbors.dtype)[:, None]
    return np.concatenate([own, neighbors], axis=1)


def partner_table(neighbors: np.ndarray, sc: ScanConfig) -> np.ndarray:
    """The entries a training partner is drawn from: the K neighbours, and with
    ``partner=neighbors_and_self`` the image itself (so 1 pair in K + 1 is an image with its
    own second augmentation, as in the authors' released code)."""
    return with_self(neighbors) if sc.partner == "neighbors_and_self" else neighbors


def selection_loss(logits: torch.Tensor, neighbors: np.ndarray, sc: ScanConfig) -> torch.Tensor:
    """The label-free loss that picks the kept head and epoch, per head.

    The authors' released behaviour (the default): consistency - 1 x entropy over each image's
    first 5 val neighbours plus the image itself. ``selection_entropy_weight=null``,
    ``selection_neighbors=null`` and ``selection_self=false`` give the other reading: the
    training loss (weight 5) over as many neighbours as training uses (``num_neighbors``; all
    mined when that is null or 0).
    """
    count = sc.num_neighbors if sc.selection_neighbors is None else sc.selection_neighbors
    table = neighbors[:, :count] if count else neighbors
    if sc.selection_self:
        table = with_self(table)
    weight = sc.entropy_weight if sc.selection_entropy_weight is None else sc.selection_entropy_weight
    return heldout_scan_loss(logits, table, weight)


def load_neighbors(run: RunDir, split: str, count: int | None) -> np.ndarray | None:
    path = run.neighbors(split)
    if not path.is_file():
        return None
    neighbors = np.load(path)
    return neighbors if count is None else neighbors[:, :count]


@exclusive
def scan(config: Config | str | Path | dict | None = None, out: str | Path = "runs/default", *,
         overrides: list[str] | dict[str, Any] | None = None, resume: bool = False,
         force: bool = False) -> dict[str, Any]:
    """Train the cluster model; returns the stage summary (also in ``scan/summary.json``)."""
    cfg, run, status = begin_stage(STAGE, config, out, overrides, resume, force, needs="mine")
    if status == "done":
        return run.summary(STAGE)
    sc = cfg.scan
    device = resolve_device(cfg.device)
    train_set = build_dataset(cfg.data, "train")
    val_set = build_dataset(cfg.data, "val")
    clusters = num_clusters(cfg, train_set)
    seed_all(derive_seed(cfg.seed, STAGE, "init"))
    model = build_cluster_model(cfg, clusters, sc.num_heads)
    pretext_state = load_checkpoint(run.checkpoint("pretext"), "pretext")
    load_state(model.backbone, backbone_state(pretext_state["model"]), run.checkpoint("pretext"))
    if not sc.update_backbone:
        freeze_backbone(model)
    forward = prepare_model(model, cfg, device, train=not sc.cached_views,
                            sync_batchnorm=sc.sync_batchnorm)

    train_neighbors = load_neighbors(run, "train", sc.num_neighbors)
    if len(train_neighbors) != len(train_set):
        raise ConfigError(f"{run.neighbors('train')} has {len(train_neighbors)} rows but the "
                          f"train split has {len(train_set)} images; rerun mine")
    partners = partner_table(train_neighbors, sc)
    val_neighbors = load_neighbors(run, "val", None)
    if val_neighbors is None or val_neighbors.shape[1] == 0:
        val_set, val_neighbors = train_set, load_neighbors(run, "train", None)
    data = data_path_for(cfg, device, train_set)
    val_data = data_path_for(cfg, device, val_set)
    views = {"anchor": sc.augment, "neighbor": sc.augment}
    if sc.cached_views:
        features, val_features = _cache(model, cfg, data, train_set, val_data, val_set, device)
        forward, data = distributed.wrap(Heads(model), device, False), features
        augment = features.augment(views, partners)
    else:
        augment = data.augment(train_set, views, partners)
    steps_per_epoch = num_batches(len(train_set), sc.batch_size, True)[1]
    optimizer = build_optimizer(model.parameters(), sc.optim, cfg.perf.optimizer_impl)
    scheduler = build_scheduler(optimizer, sc.optim, steps_per_epoch * sc.epochs)

    start_epoch, seconds = 0, 0.0
    best: dict[str, Any] = {"loss": float("inf"), "head": 0, "epoch": 0, "model": cpu_state(model)}
    history: list[list[float]] = []
    if status == "resume":
        state = load_checkpoint(run.checkpoint(STAGE), STAGE)
        distributed.check_resume(state, STAGE)
        load_state(model, state["model"], run.checkpoint(STAGE))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        start_epoch, seconds = state["epoch"], state["seconds"]
        best, history = state["best"], state["history"]
        log.info("scan: resuming at epoch %d/%d", start_epoch, sc.epochs)

    step = TrainStep(scan_body(forward, augment, sc.entropy_weight, device, cfg.amp),
                     model.parameters(), device, cfg.perf.cuda_graphs and augment.on_device)
    for epoch in range(start_epoch, sc.epochs):
        seed_all(derive_seed(cfg.seed, STAGE, epoch))
        batches = data.batches(augment, sc.batch_size, shuffle=True,
                               seed=derive_seed(cfg.seed, STAGE, "order", epoch), train=True)
        stats = train_one_epoch(model, step, batches, optimizer, scheduler, sc.update_backbone,
                                device, cfg.progress, f"scan {epoch + 1}/{sc.epochs}")
        check_finite(stats, STAGE, epoch + 1, cfg, model)
        seconds += stats["seconds"]
        if sc.cached_views:
            with torch.no_grad():
                logits = model.eval().forward_heads(val_features).float().cpu()
        else:
            logits, _ = predict_logits(model, val_data, val_set, cfg.evaluate.batch_size, device,
                                       cfg.amp, channels_last(cfg, device, False), False)
        val_loss = selection_loss(logits, val_neighbors, sc)
        history.append(val_loss.tolist())
        head = int(val_loss.argmin())
        if float(val_loss[head]) < best["loss"]:
            best = {"loss": float(val_loss[head]), "head": head, "epoch": epoch + 1,
                    "model": cpu_state(model),
                    "sizes": torch.bincount(logits[head].argmax(1), minlength=clusters).tolist()}
        run.log(STAGE, epoch=epoch + 1, lr=scheduler.get_last_lr()[0], val_loss=val_loss.tolist(),
                best_head=best["head"], best_epoch=best["epoch"], **stats)
        log.info("scan epoch %d/%d  loss %.4f  val loss %.4f (head %d)  %.0f img/s (%s step)",
                 epoch + 1, sc.epochs, stats["loss"], float(val_loss[head]), head,
                 stats["images_per_s"], step.mode)
        if checkpoint_due(epoch + 1, epoch + 1 == sc.epochs, cfg.checkpoint_every):
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
    if "sizes" in best:
        collapse_warning(best["sizes"], f"scan (head {best['head']}, epoch {best['epoch']}, "
                         f"on the val split)")
    summary = {"seconds": seconds, "epochs": sc.epochs, "best_head": best["head"],
               "best_epoch": best["epoch"], "best_loss": best["loss"],
               "num_clusters": clusters, "data_path": data.name, "step": step.mode}
    run.finish(STAGE, summary)
    return summary


def _cache(model: ClusterModel, cfg: Config, data: DataPath, train_set: ImageDataset,
           val_data: DataPath, val_set: ImageDataset,
           device: torch.device) -> tuple[FeaturePath, torch.Tensor]:
    """Train features (eval view + ``scan.cached_views`` augmented views) and val eval features."""
    sc = cfg.scan
    store = feature_store(cfg.perf.device_data_gb, sc.cached_views, len(train_set),
                          model.backbone.out_dim, device)
    started = time.perf_counter()
    train = cache_features(model.backbone, data, train_set, sc.augment, sc.cached_views,
                           cfg.evaluate.batch_size, device, cfg.amp, cfg.seed, store, cfg.progress)
    val = cache_features(model.backbone, val_data, val_set, sc.augment, 0,
                         cfg.evaluate.batch_size, device, cfg.amp, cfg.seed, store, cfg.progress)
    log.info("scan: cached %d views of %d train images in %.1f s", sc.cached_views + 1,
             len(train_set), time.perf_counter() - started)
    targets = torch.from_numpy(train_set.targets).to(store[0])
    return FeaturePath(train, targets, device), val[0].to(device, torch.float32)


def load_scan_model(run: RunDir) -> tuple[ClusterModel, dict[str, Any]]:
    """The kept cluster model of a finished SCAN stage, reduced to its best head.

    The network is built from the config saved in the checkpoint, not the current one, so a
    later change of ``model.*`` cannot mismatch the weights.
    """
    state = load_checkpoint(run.checkpoint(STAGE), STAGE)
    model = build_cluster_model(load_config(state["config"]), state["num_clusters"],
                                state["num_heads"])
    load_state(model, state["best"]["model"], run.checkpoint(STAGE))
    model.keep_head(state["best"]["head"])
    return model, state
