"""Stage 4, self-label: confident predictions become labels for the strongly augmented view.

Samples whose weak-view prediction is confident (max probability > threshold) are usually
right; training on them with a strong augmentation corrects the neighbours' noise. The weights
are kept where the number of confident samples stops growing, a criterion that needs no label.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from scanclust import distributed
from scanclust.checkpoint import load_state
from scanclust.config import Config
from scanclust.data import build_dataset
from scanclust.data.pipelines import Augment, Batch, data_path_for
from scanclust.engine import Loop, cpu_state, feature_path, prepare_model, stage
from scanclust.rundir import RunDir
from scanclust.losses import masked_cross_entropy
from scanclust.models import Heads
from scanclust.models.saved import load_cluster_model
from scanclust.runtime import autocast

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



class SelfLabelLoop(Loop):
    """A batch without a confident sample is no update: it is skipped and counted (deciding
    that reads the global batch's count on the host, one sync per step after the step's
    kernels are queued: the price of a loss that may not exist). The weights kept are those of
    the epoch after which the number of confident samples stopped growing by more than
    ``plateau_tolerance`` of the data set (of the EMA weights with ``selflabel.ema``)."""

    def __init__(self, *args: Any, ema: AveragedModel | None, samples: int, **kwargs: Any) -> None:
        super().__init__(*args, samples=samples, **kwargs)
        self.ema, self.samples = ema, samples
        self.tolerance = self.settings.plateau_tolerance * samples
        self.plateau, self.confident = 0, 0
        self.best: dict[str, Any] = {"confident": -1, "epoch": 0, "model": self.kept()}
        self.history: list[int] = []

    def kept(self) -> dict[str, torch.Tensor]:
        return cpu_state(self.ema.module if self.ema is not None else self.model)

    def train_mode(self) -> None:
        self.model.train_mode(self.settings.update_backbone)
        self.confident = 0

    def skip(self, out: Batch) -> bool:
        count = int(out["confident"])
        self.confident += count
        return count == 0

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def epoch_stats(self, loss: torch.Tensor, steps: int, skipped: int) -> dict[str, Any]:
        return {"loss": float(loss) / max(steps, 1), "confident": self.confident,
                "skipped_batches": skipped}

    def end_epoch(self, stats: dict[str, Any]) -> dict[str, Any]:
        self.history.append(stats["confident"])
        if stats["confident"] > self.best["confident"] + self.tolerance:
            self.best = {"confident": stats["confident"], "epoch": self.epoch,
                         "model": self.kept()}
            self.plateau = 0
        else:
            self.plateau += 1
        return {"kept_epoch": self.best["epoch"]}

    def note(self, stats: dict[str, Any], record: dict[str, Any]) -> str:
        return f"confident {stats['confident']}/{self.samples}  "

    def stopped(self) -> bool:
        return self.settings.patience is not None and self.plateau >= self.settings.patience

    def state(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict() if self.ema is not None else {},
                "plateau": self.plateau, "best": self.best, "history": self.history,
                "num_clusters": self.model.num_clusters}

    def load(self, state: dict[str, Any]) -> None:
        if self.ema is not None:
            load_state(self.ema, state["ema"], self.run.checkpoint(STAGE))
        self.plateau, self.best, self.history = state["plateau"], state["best"], state["history"]


@stage(STAGE, needs="scan")
def selflabel(cfg: Config, run: RunDir, status: str, device: torch.device) -> dict[str, Any]:
    """Fine-tune the kept SCAN head by self-labelling; returns the stage summary."""
    sl = cfg.selflabel
    model, _ = load_cluster_model(run, "scan")
    if not sl.update_backbone:
        model.freeze_backbone()
    forward = prepare_model(model, cfg, device, train=not sl.cached_views,
                            sync_batchnorm=sl.sync_batchnorm)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(sl.ema), use_buffers=True)
           if sl.ema is not None else None)
    dataset = build_dataset(cfg.data, "train")
    data = data_path_for(cfg, device, dataset)
    if sl.cached_views:
        data = feature_path(model.backbone, cfg, data, dataset, sl.augment, sl.cached_views,
                            device)
        forward = distributed.wrap(Heads(model), device, False)
    augment = data.augment(dataset, {"weak": "eval", "strong": sl.augment})
    loop = SelfLabelLoop(STAGE, cfg, run, model,
                         selflabel_body(forward, augment, sl.threshold, sl.class_balance,
                                        device, cfg.amp),
                         data, augment, device=device, ema=ema, samples=len(dataset))
    loop.fit(resume=status == "resume")
    summary = {"seconds": loop.seconds, "epochs": loop.epoch, "kept_epoch": loop.best["epoch"],
               "confident": loop.best["confident"], "num_samples": len(dataset),
               "stopped_early": loop.epoch < sl.epochs, "data_path": data.name,
               "step": loop.step.mode}
    run.finish(STAGE, summary)
    return summary
