"""Stage 3, SCAN: train a cluster model so that images and their neighbours agree, confidently.

Each step pairs every anchor with a partner drawn uniformly among its K mined neighbours and,
as the authors' released code does (``scan.partner``), the image itself; both under the strong
augmentation. After each epoch a label-free selection loss of every head is measured on the val
split (eval view, val neighbours; ``selection_loss``); the head and epoch with the lowest loss
are kept.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import numpy as np
import torch

from scanclust import distributed
from scanclust.checkpoint import load_checkpoint, load_state
from scanclust.config import Config, ConfigError, ScanConfig
from scanclust.data import build_dataset
from scanclust.data.pipelines import Augment, Batch, data_path_for
from scanclust.engine import (Loop, cpu_state, feature_path, log, predict_logits,
                              prepare_model, stage)
from scanclust.health import collapse_warning
from scanclust.losses import (EPS, batch_marginal, cluster_probabilities, prior_divergence,
                              scan_loss)
from scanclust.merge import merge_map
from scanclust.models import ClusterModel, Heads, backbone_state, build_cluster_model
from scanclust.preflight import num_clusters
from scanclust.rundir import RunDir
from scanclust.runtime import autocast, derive_seed, seed_all

STAGE = "scan"


class AdaptivePrior:
    """``scan.prior=adaptive``: the cluster prior of the SCAN loss (``losses.scan_loss``)
    re-estimated from the model's own predictions instead of fixed at 1/K per cluster.

    ``estimate`` (``[H, K]``, one per head, starting uniform) is an exponential moving average
    of the global batch's mean prediction, decay ``momentum`` per step; the loss pulls the
    batch mean towards ``target``, the estimate mixed with ``floor`` of the uniform prior. So a
    cluster may keep the share of the data it has, while one shrinking below ``floor / K`` is
    pushed back as hard as by the uniform prior: the entropy term's guard against empty
    clusters stays, its pull towards equal sizes goes. The estimate lives on the device and
    is updated in place inside the step (a captured CUDA graph replays the update); the
    checkpoint holds it (``ScanLoop.state``).

    For the first ``warmup`` epochs the target is the uniform prior (the estimate follows the
    marginal all the same): the clusters form under the paper's loss, and only then may their
    sizes follow the data, so that an early lead of a few clusters is not locked in.
    """

    def __init__(self, heads: int, clusters: int, momentum: float, floor: float,
                 device: torch.device, warmup: int = 0) -> None:
        self.estimate = torch.full((heads, clusters), 1.0 / clusters, device=device)
        self.momentum, self.floor, self.warmup = momentum, floor, warmup
        # the uniform share of the target, a device tensor so that a captured step reads it
        self.uniform_share = torch.tensor(1.0 if warmup else floor, device=device)

    def begin_epoch(self, epoch: int) -> None:
        self.uniform_share.fill_(1.0 if epoch < self.warmup else self.floor)

    def target(self) -> torch.Tensor:
        share = self.uniform_share
        return (1 - share) * self.estimate + share / self.estimate.shape[-1]

    def update(self, anchor_logits: torch.Tensor) -> None:
        """Move the estimate towards the global batch's mean prediction (one all-reduce of
        ``[H, K]`` under torchrun, as the loss's own)."""
        with torch.no_grad():
            marginal = batch_marginal(cluster_probabilities(anchor_logits), global_batch=True)
            self.estimate.lerp_(marginal, 1 - self.momentum)


def scan_body(forward: Callable, augment: Augment, entropy_weight: float, device: torch.device,
              amp: bool, prior: AdaptivePrior | None = None) -> Callable[[Batch], Batch]:
    """The SCAN step's body (``scanclust.step``): anchors and partners through ``forward`` (the
    model on images, or its heads on cached features) in one pass, SCAN loss (entropy of the
    global batch's mean prediction, or its divergence from the adaptive ``prior``, which the
    step then updates), gradients."""

    def body(batch: Batch) -> Batch:
        views = augment(batch)
        with autocast(device, amp):
            logits = forward(torch.cat([views["anchor"], views["neighbor"]]))
        anchor_logits, neighbor_logits = logits.chunk(2, dim=1)
        total, consistency, entropy = scan_loss(
            anchor_logits, neighbor_logits, entropy_weight, global_batch=True,
            prior=None if prior is None else prior.target())
        total.sum().backward()
        if prior is not None:
            prior.update(anchor_logits.detach())
        return {"loss": torch.stack([total.sum(), consistency.mean(), entropy.mean()]).detach()}

    return body


class ScanLoop(Loop):
    """After every epoch the selection loss of each head on the val split; the lowest head and
    epoch so far are kept (``best``), with their weights."""

    def __init__(self, *args: Any, val: Callable[[], torch.Tensor], val_neighbors: np.ndarray,
                 clusters: int, prior: AdaptivePrior | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val, self.val_neighbors, self.clusters = val, val_neighbors, clusters
        self.prior = prior
        self.merge: list[int] | None = None  # scan.overcluster: set after the last epoch
        self.best: dict[str, Any] = {"loss": float("inf"), "head": 0, "epoch": 0,
                                     "model": cpu_state(self.model)}
        self.history: list[list[float]] = []

    def train_mode(self) -> None:
        self.model.train_mode(self.settings.update_backbone)

    def begin_epoch(self) -> None:
        if self.prior is not None:
            self.prior.begin_epoch(self.epoch)

    def epoch_stats(self, loss: torch.Tensor, steps: int, skipped: int) -> dict[str, Any]:
        total, consistency, entropy = (loss / max(steps, 1)).tolist()
        return {"loss": total, "consistency": consistency, "entropy": entropy}

    def end_epoch(self, stats: dict[str, Any]) -> dict[str, Any]:
        logits = self.val()
        prior = None if self.prior is None else self.prior.target().cpu()
        val_loss = selection_loss(logits, self.val_neighbors, self.settings, prior)
        self.history.append(val_loss.tolist())
        self.head = int(val_loss.argmin())
        self.head_loss = float(val_loss[self.head])
        if self.head_loss < self.best["loss"]:
            sizes = torch.bincount(logits[self.head].argmax(1), minlength=self.clusters)
            self.best = {"loss": self.head_loss, "head": self.head, "epoch": self.epoch,
                         "model": cpu_state(self.model), "sizes": sizes.tolist()}
        return {"val_loss": val_loss.tolist(), "best_head": self.best["head"],
                "best_epoch": self.best["epoch"]}

    def note(self, stats: dict[str, Any], record: dict[str, Any]) -> str:
        return f"val loss {self.head_loss:.4f} (head {self.head})  "

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "history": self.history, "num_clusters": self.clusters,
                "num_heads": self.settings.num_heads,
                "prior": None if self.prior is None else self.prior.estimate.cpu(),
                "merge": self.merge}

    def load(self, state: dict[str, Any]) -> None:
        self.best, self.history = state["best"], state["history"]
        self.merge = state.get("merge")
        if self.prior is not None:  # in place: a captured step holds the tensor
            self.prior.estimate.copy_(state["prior"])


def heldout_scan_loss(logits: torch.Tensor, neighbors: np.ndarray, entropy_weight: float,
                      chunk: int = 1024, prior: torch.Tensor | None = None) -> torch.Tensor:
    """SCAN loss per head over a whole split, each sample against all its neighbours (with
    ``prior``, ``[H, K]``, its divergence from the prior in place of the entropy, as in
    training).

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
    if prior is not None:
        return consistency + entropy_weight * prior_divergence(probs.mean(1), prior)
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


def selection_loss(logits: torch.Tensor, neighbors: np.ndarray, sc: ScanConfig,
                   prior: torch.Tensor | None = None) -> torch.Tensor:
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
    return heldout_scan_loss(logits, table, weight, prior=prior)


def load_neighbors(run: RunDir, split: str, count: int | None) -> np.ndarray | None:
    path = run.neighbors(split)
    if not path.is_file():
        return None
    neighbors = np.load(path)
    return neighbors if count is None else neighbors[:, :count]



@stage(STAGE, needs="mine")
def scan(cfg: Config, run: RunDir, status: str, device: torch.device) -> dict[str, Any]:
    """Train the cluster model; returns the stage summary (also in ``scan/summary.json``)."""
    sc = cfg.scan
    train_set = build_dataset(cfg.data, "train")
    val_set = build_dataset(cfg.data, "val")
    clusters = num_clusters(cfg, train_set)
    trained = clusters * sc.overcluster
    seed_all(derive_seed(cfg.seed, STAGE, "init"))
    model = build_cluster_model(cfg, trained, sc.num_heads)
    pretext_state = load_checkpoint(run.checkpoint("pretext"), "pretext")
    load_state(model.backbone, backbone_state(pretext_state["model"]), run.checkpoint("pretext"))
    if not sc.update_backbone:
        model.freeze_backbone()
    forward = prepare_model(model, cfg, device, train=not sc.cached_views,
                            sync_batchnorm=sc.sync_batchnorm)

    train_neighbors = load_neighbors(run, "train", sc.num_neighbors)
    if len(train_neighbors) != len(train_set):
        raise ConfigError(f"{run.neighbors('train')} has {len(train_neighbors)} rows but the "
                          f"train split has {len(train_set)} images; rerun mine")
    val_neighbors = load_neighbors(run, "val", None)
    if val_neighbors is None or val_neighbors.shape[1] == 0:
        val_set, val_neighbors = train_set, load_neighbors(run, "train", None)
    data = data_path_for(cfg, device, train_set)
    val_data = data_path_for(cfg, device, val_set)
    if sc.cached_views:
        data, val = _cached(model, cfg, data, train_set, val_data, val_set, device)
        forward = distributed.wrap(Heads(model), device, False)
    else:
        def val() -> torch.Tensor:
            return predict_logits(model, val_data, val_set, cfg.evaluate.batch_size, device,
                                  cfg.amp, False)[0]
    views = {"anchor": sc.augment, "neighbor": sc.augment}
    augment = data.augment(train_set, views, partner_table(train_neighbors, sc))
    prior = (AdaptivePrior(sc.num_heads, trained, sc.prior_momentum, sc.prior_floor, device,
                           round(sc.prior_warmup * sc.epochs)) if sc.prior == "adaptive" else None)
    loop = ScanLoop(STAGE, cfg, run, model,
                    scan_body(forward, augment, sc.entropy_weight, device, cfg.amp, prior), data,
                    augment, len(train_set), device, val=val, val_neighbors=val_neighbors,
                    clusters=trained, prior=prior)
    loop.fit(resume=status == "resume")
    best = loop.best
    merged = {}
    if sc.overcluster > 1:
        probs = _best_probabilities(loop, cfg, train_set, data, device)
        loop.merge = merge_map(probs, train_neighbors, clusters, sc.merge_resolution).tolist()
        loop.save()
        trained_sizes = np.bincount(probs.argmax(1), minlength=trained)
        merged = {"trained_clusters": trained, "trained_sizes": trained_sizes.tolist(),
                  "merge": loop.merge}
        # the trained clusters may well be empty; what must not be is a merged one
        collapse_warning(np.bincount(loop.merge, trained_sizes, clusters).astype(int).tolist(),
                         f"scan (head {best['head']}, epoch {best['epoch']}, merged from "
                         f"{trained} clusters, on the train split)")
    elif "sizes" in best:
        collapse_warning(best["sizes"], f"scan (head {best['head']}, epoch {best['epoch']}, "
                         f"on the val split)")
    summary = {"seconds": loop.seconds, "epochs": sc.epochs, "best_head": best["head"],
               "best_epoch": best["epoch"], "best_loss": best["loss"],
               "num_clusters": clusters, **merged, "data_path": data.name,
               "step": loop.step.mode}
    run.finish(STAGE, summary)
    return summary


def _best_probabilities(loop: ScanLoop, cfg: Config, train_set: Any, data: Any,
                        device: torch.device) -> np.ndarray:
    """The kept head's probabilities on the train split's eval view (its cached features when
    SCAN trained on them), for the merge of ``scan.overcluster``."""
    best = copy.deepcopy(loop.model)
    load_state(best, loop.best["model"], loop.run.checkpoint(STAGE))
    best.keep_head(loop.best["head"])
    best.eval()
    if cfg.scan.cached_views:
        with torch.no_grad():
            logits = torch.cat([best.forward_heads(part.to(device, torch.float32))[0].float().cpu()
                                for part in data.features[0].split(4096)])
    else:
        logits = predict_logits(best, data_path_for(cfg, device, train_set), train_set,
                                cfg.evaluate.batch_size, device, cfg.amp, cfg.progress,
                                "scan: clusters to merge")[0][0]
    return torch.softmax(logits, dim=1).numpy()


def _cached(model: ClusterModel, cfg: Config, data: Any, train_set: Any, val_data: Any,
            val_set: Any, device: torch.device) -> tuple[Any, Callable[[], torch.Tensor]]:
    """Train features (eval view + ``scan.cached_views`` augmented views), and the heads'
    val logits on cached val eval features."""
    sc = cfg.scan
    started = time.perf_counter()
    train = feature_path(model.backbone, cfg, data, train_set, sc.augment, sc.cached_views,
                         device)
    store = (train.features.device, train.features.dtype)
    val_features = feature_path(model.backbone, cfg, val_data, val_set, sc.augment, 0, device,
                                store).features[0].to(device, torch.float32)
    log.info("scan: cached %d views of %d train images in %.1f s", sc.cached_views + 1,
             len(train_set), time.perf_counter() - started)

    def val() -> torch.Tensor:
        with torch.no_grad():
            return model.eval().forward_heads(val_features).float().cpu()

    return train, val
