"""Stage 4, self-label: confident predictions become labels for the strongly augmented view.

Samples whose weak-view prediction is confident (max probability > threshold) are usually
right; training on them with a strong augmentation corrects the neighbours' noise. The weights
are kept where the number of confident samples stops growing, a criterion that needs no label.

On weak features no sample may reach the paper's 0.99, and the stage would keep SCAN's weights;
``selection=per_cluster`` trains instead on each cluster's most confident samples of a batch
(``losses.per_cluster_mask``), so every cluster keeps pseudo labels and none is starved. That
count is fixed by construction, so there the weights are kept where the mean weak-view
confidence of the epoch's samples stops growing: the continuous form of the same criterion.
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
                   device: torch.device, amp: bool,
                   fraction: float | None = None) -> Callable[[Batch], Batch]:
    """The self-label step's body (``scanclust.step``): weak and strong views, the masked
    cross-entropy (samples above ``threshold``, or with ``fraction`` each cluster's most
    confident ones; counts and class weights of the global batch), gradients; ``forward`` is
    the model on images or its heads on features. Besides the loss it returns the global
    batch's number of samples trained on (``selected``), of samples above the threshold
    (``confident``) and its summed weak-view confidence (``confidence``)."""

    def body(batch: Batch) -> Batch:
        views = augment(batch)
        with autocast(device, amp):
            with torch.no_grad():
                weak_logits = forward(views["weak"])[0]
            strong_logits = forward(views["strong"])[0]
        loss, selected = masked_cross_entropy(weak_logits, strong_logits, threshold,
                                              class_balance, global_batch=True,
                                              fraction=fraction)
        loss.backward()
        confidence = torch.softmax(weak_logits.detach().float(), dim=-1).amax(-1)
        counts = distributed.reduce_sum(torch.stack([(confidence > threshold).sum().float(),
                                                     confidence.sum()]))
        return {"loss": loss.detach(), "selected": selected,
                "confident": counts[0].to(torch.long), "confidence": counts[1]}

    return body



class SelfLabelLoop(Loop):
    """A batch without a selected sample is no update: it is skipped and counted (deciding
    that reads the global batch's count on the host, one sync per step after the step's
    kernels are queued: the price of a loss that may not exist; a per-cluster selection always
    has samples, so it reads nothing). The weights kept are those of the epoch after which the
    epoch's measure stopped growing by more than ``plateau_tolerance`` of the data set (of the
    EMA weights with ``selflabel.ema``): the number of samples above the threshold, or with
    ``selection=per_cluster`` the summed weak-view confidence. The start (SCAN's weights,
    epoch 0) counts 0, so where no epoch beats that by the tolerance SCAN's weights stay."""

    def __init__(self, *args: Any, ema: AveragedModel | None, samples: int, **kwargs: Any) -> None:
        super().__init__(*args, samples=samples, **kwargs)
        self.ema, self.samples = ema, samples
        self.per_cluster = self.settings.selection == "per_cluster"
        self.tolerance = self.settings.plateau_tolerance * samples
        self.plateau = 0
        self.totals = torch.zeros(2, device=self.device)  # confident count, summed confidence
        self.best: dict[str, Any] = {"measure": 0.0, "confident": 0, "epoch": 0,
                                     "model": self.kept()}
        self.history: list[int] = []

    def kept(self) -> dict[str, torch.Tensor]:
        return cpu_state(self.ema.module if self.ema is not None else self.model)

    def train_mode(self) -> None:
        self.model.train_mode(self.settings.update_backbone)
        self.totals = torch.zeros(2, device=self.device)

    def skip(self, out: Batch) -> bool:
        self.totals += torch.stack([out["confident"].float(), out["confidence"]])
        return not self.per_cluster and int(out["selected"]) == 0

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def epoch_stats(self, loss: torch.Tensor, steps: int, skipped: int) -> dict[str, Any]:
        confident, confidence = self.totals.tolist()
        seen = (steps + skipped) * self.settings.batch_size
        return {"loss": float(loss) / max(steps, 1), "confident": int(confident),
                "mean_confidence": confidence / max(seen, 1), "skipped_batches": skipped,
                "measure": confidence if self.per_cluster else confident}

    def end_epoch(self, stats: dict[str, Any]) -> dict[str, Any]:
        self.history.append(stats["confident"])
        if stats["measure"] > self.best["measure"] + self.tolerance:
            self.best = {"measure": stats["measure"], "confident": stats["confident"],
                         "mean_confidence": stats["mean_confidence"], "epoch": self.epoch,
                         "model": self.kept()}
            self.plateau = 0
        else:
            self.plateau += 1
        return {"kept_epoch": self.best["epoch"]}

    def note(self, stats: dict[str, Any], record: dict[str, Any]) -> str:
        return (f"confident {stats['confident']}/{self.samples}  mean confidence "
                f"{stats['mean_confidence']:.3f}  ")

    def stopped(self) -> bool:
        return self.settings.patience is not None and self.plateau >= self.settings.patience

    def state(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict() if self.ema is not None else {},
                "plateau": self.plateau, "best": self.best, "history": self.history,
                "num_clusters": self.model.num_clusters, "merge": self.model.merge_mapping()}

    def load(self, state: dict[str, Any]) -> None:
        if self.ema is not None:
            load_state(self.ema, state["ema"], self.run.checkpoint(STAGE))
        self.plateau, self.best, self.history = state["plateau"], state["best"], state["history"]
        self.best.setdefault("measure", self.best["confident"])  # a checkpoint made before


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
                                        device, cfg.amp, sl.per_cluster_fraction
                                        if sl.selection == "per_cluster" else None),
                         data, augment, device=device, ema=ema, samples=len(dataset))
    loop.fit(resume=status == "resume")
    summary = {"seconds": loop.seconds, "epochs": loop.epoch, "kept_epoch": loop.best["epoch"],
               "confident": loop.best["confident"], "num_samples": len(dataset),
               "selection": sl.selection, "threshold": sl.threshold,
               "most_confident": max(loop.history, default=0),
               "stopped_early": loop.epoch < sl.epochs, "data_path": data.name,
               "step": loop.step.mode}
    run.finish(STAGE, summary)
    return summary
