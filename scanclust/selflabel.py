"""Stage 4, self-label: confident predictions become labels for the strongly augmented view.

Samples whose weak-view prediction is confident (max probability > threshold) are usually
right; training on them with a strong augmentation corrects the neighbours' noise. The weights
are kept where the number of confident samples stops growing, a criterion that needs no label.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from scanclust import distributed
from scanclust.checkpoint import load_checkpoint, load_state, save_checkpoint
from scanclust.config import Config, load_config
from scanclust.cached import FeaturePath, cache_features, feature_store
from scanclust.data import build_dataset
from scanclust.data.paths import Augment, Batch, Batches, data_path_for, num_batches
from scanclust.health import check_finite
from scanclust.losses import masked_cross_entropy
from scanclust.models import ClusterModel, Heads
from scanclust.rundir import RunDir, exclusive
from scanclust.runtime import autocast, capture_rng, derive_seed, resolve_device, restore_rng, seed_all
from scanclust.scan import build_cluster_model, freeze_backbone, load_scan_model, set_train_mode
from scanclust.step import TrainStep
from scanclust.training import (build_optimizer, build_scheduler, checkpoint_due, cpu_state, log,
                                prepare_model, progress, begin_stage)

STAGE = "selflabel"


def selflabel_body(forward: Callable, augment: Augment, threshold: float, class_balance: bool,
                   device: torch.device, amp: bool) -> Callable[[Batch], Batch]:
    """The self-label step's body (``scanclust.step``): weak and strong views, the confidence-
    masked cross-entropy (mask counts and class weights of the global batch), gradients;
    ``forward`` is the model on images or its heads on features."""

    def body(batch: Batch) -> Batch:
        views = augment(batch)
        with autocast(device, amp):
            with torch.no_grad():
                weak_logits = forward(views["weak"])[0]
            strong_logits = forward(views["strong"])[0]
        loss, confident = masked_cross_entropy(weak_logits, strong_logits, threshold,
                                               class_balance, global_batch=True)
        loss.backward()
        return {"loss": loss.detach(), "confident": confident}

    return body


def train_one_epoch(model: ClusterModel, step: TrainStep, batches: Batches,
                    optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, update_backbone: bool,
                    ema: AveragedModel | None, device: torch.device, show: bool,
                    desc: str) -> dict[str, Any]:
    """One epoch of self-labelling.

    A batch without a confident sample is skipped (no optimizer step) and counted. Deciding
    that needs the count on the host, one sync per step after the step's kernels are queued;
    it is the price of a loss that may not exist. The count is the global batch's, so every
    process decides alike.
    """
    set_train_mode(model, update_backbone)
    loss_sum = torch.zeros((), device=device)
    confident = steps = skipped = images = 0
    start = time.perf_counter()
    for batch in progress(batches, show, desc):
        out = step(batch)
        count = int(out["confident"])
        images += len(batch["index"])
        confident += count
        if count == 0:
            skipped += 1
            continue
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += out["loss"]
        steps += 1
    mean_loss = float(distributed.mean_over_processes(loss_sum)) / max(steps, 1)
    seconds = time.perf_counter() - start
    images *= distributed.world_size()
    return {"loss": mean_loss, "confident": confident, "skipped_batches": skipped,
            "images_per_s": images / max(seconds, 1e-9), "seconds": seconds}


@exclusive
def selflabel(config: Config | str | Path | dict | None = None,
              out: str | Path = "runs/default", *,
              overrides: list[str] | dict[str, Any] | None = None, resume: bool = False,
              force: bool = False) -> dict[str, Any]:
    """Fine-tune the kept SCAN head by self-labelling; returns the stage summary."""
    cfg, run, status = begin_stage(STAGE, config, out, overrides, resume, force, needs="scan")
    if status == "done":
        return run.summary(STAGE)
    sl = cfg.selflabel
    device = resolve_device(cfg.device)
    model, _ = load_scan_model(run)
    if not sl.update_backbone:
        freeze_backbone(model)
    forward = prepare_model(model, cfg, device, train=not sl.cached_views,
                            sync_batchnorm=sl.sync_batchnorm)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(sl.ema), use_buffers=True)
           if sl.ema is not None else None)
    dataset = build_dataset(cfg.data, "train")
    data = data_path_for(cfg, device, dataset)
    views = {"weak": "eval", "strong": sl.augment}
    if sl.cached_views:
        store = feature_store(cfg.perf.device_data_gb, sl.cached_views, len(dataset),
                              model.backbone.out_dim, device)
        feats = cache_features(model.backbone, data, dataset, sl.augment, sl.cached_views,
                               cfg.evaluate.batch_size, device, cfg.amp, cfg.seed, store,
                               cfg.progress)
        data = FeaturePath(feats, torch.from_numpy(dataset.targets).to(store[0]), device)
        forward = distributed.wrap(Heads(model), device, False)
        augment = data.augment(views)
    else:
        augment = data.augment(dataset, views)
    steps_per_epoch = num_batches(len(dataset), sl.batch_size, True)[1]
    optimizer = build_optimizer(model.parameters(), sl.optim, cfg.perf.optimizer_impl)
    scheduler = build_scheduler(optimizer, sl.optim, steps_per_epoch * sl.epochs)

    kept = _kept_weights(model, ema)
    start_epoch, seconds, plateau = 0, 0.0, 0
    best: dict[str, Any] = {"confident": -1, "epoch": 0, "model": kept}
    history: list[int] = []
    if status == "resume":
        state = load_checkpoint(run.checkpoint(STAGE), STAGE)
        distributed.check_resume(state, STAGE)
        load_state(model, state["model"], run.checkpoint(STAGE))
        if ema is not None:
            load_state(ema, state["ema"], run.checkpoint(STAGE))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        start_epoch, seconds, plateau = state["epoch"], state["seconds"], state["plateau"]
        best, history = state["best"], state["history"]
        log.info("selflabel: resuming at epoch %d/%d", start_epoch, sl.epochs)

    step = TrainStep(selflabel_body(forward, augment, sl.threshold, sl.class_balance, device,
                                    cfg.amp),
                     model.parameters(), device, cfg.perf.cuda_graphs and augment.on_device)
    tolerance = sl.plateau_tolerance * len(dataset)
    epoch = start_epoch
    while epoch < sl.epochs and not (sl.patience is not None and plateau >= sl.patience):
        seed_all(derive_seed(cfg.seed, STAGE, epoch))
        batches = data.batches(augment, sl.batch_size, shuffle=True,
                               seed=derive_seed(cfg.seed, STAGE, "order", epoch), train=True)
        stats = train_one_epoch(model, step, batches, optimizer, scheduler, sl.update_backbone,
                                ema, device, cfg.progress, f"selflabel {epoch + 1}/{sl.epochs}")
        check_finite(stats, STAGE, epoch + 1, cfg, model)
        epoch += 1
        seconds += stats["seconds"]
        history.append(stats["confident"])
        if stats["confident"] > best["confident"] + tolerance:
            best = {"confident": stats["confident"], "epoch": epoch,
                    "model": _kept_weights(model, ema)}
            plateau = 0
        else:
            plateau += 1
        run.log(STAGE, epoch=epoch, lr=scheduler.get_last_lr()[0], kept_epoch=best["epoch"],
                **stats)
        log.info("selflabel epoch %d/%d  loss %.4f  confident %d/%d  %.0f img/s (%s step)",
                 epoch, sl.epochs, stats["loss"], stats["confident"], len(dataset),
                 stats["images_per_s"], step.mode)
        last = epoch == sl.epochs or (sl.patience is not None and plateau >= sl.patience)
        if checkpoint_due(epoch, last, cfg.checkpoint_every):
            save_checkpoint(run.checkpoint(STAGE), STAGE, {
                "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else {},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "rng": capture_rng(), "seconds": seconds, "plateau": plateau,
                "best": best, "history": history, "config": cfg.to_dict(),
                "num_clusters": model.num_clusters})
    if sl.epochs == 0:
        save_checkpoint(run.checkpoint(STAGE), STAGE, {
            "model": model.state_dict(), "epoch": 0, "seconds": 0.0, "best": best,
            "history": [], "config": cfg.to_dict(), "num_clusters": model.num_clusters})
    summary = {"seconds": seconds, "epochs": epoch, "kept_epoch": best["epoch"],
               "confident": best["confident"], "num_samples": len(dataset),
               "stopped_early": epoch < sl.epochs, "data_path": data.name, "step": step.mode}
    run.finish(STAGE, summary)
    return summary


def _kept_weights(model: ClusterModel, ema: AveragedModel | None) -> dict[str, torch.Tensor]:
    return cpu_state(ema.module if ema is not None else model)


def load_selflabel_model(run: RunDir) -> tuple[ClusterModel, dict[str, Any]]:
    """The kept (plateau) weights of a finished self-label stage."""
    state = load_checkpoint(run.checkpoint(STAGE), STAGE)
    model = build_cluster_model(load_config(state["config"]), state["num_clusters"], 1)
    load_state(model, state["best"]["model"], run.checkpoint(STAGE))
    return model, state
