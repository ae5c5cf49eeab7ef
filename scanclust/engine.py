"""The training engine: what every stage shares, written once.

- ``begin_stage``: a stage's lifecycle up to its first computation (config, device, lock, plan,
  preflight), so every refusal comes before any file is written.
- ``Loop``: the epoch loop of the three training stages. It owns the skeleton: resume from the
  checkpoint, reseed each epoch, one pass of the step over the epoch's batches
  (``train_one_epoch``), the finiteness check, the log line and the checkpoint of every epoch.
  A stage subclasses it for what is its own: the training mode, what it keeps after an epoch
  (``end_epoch``), when it stops, and what its checkpoint holds beside the weights.
- ``infer``: the one loop that runs a model over a whole split for inference (mining features,
  cached features, predictions), sharded over the processes under torchrun.

The step itself (augmentation, forward, loss, backward of one batch) is the stage's ``body``,
run eagerly or as a CUDA graph by ``step.TrainStep``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from scanclust import distributed, frozen_features
from scanclust.checkpoint import load_checkpoint, load_state, save_checkpoint
from scanclust.config import COMPILE_SCOPES, Config, ConfigError, OptimConfig, load_config
from scanclust.data.pipelines import (Augment, Batches, DataPath, FeaturePath, feature_store,
                                      num_batches)
from scanclust.health import check_finite
from scanclust.preflight import preflight
from scanclust.rundir import RunDir, exclusive
from scanclust.runtime import (autocast, capture_rng, channels_last, derive_seed, resolve_device,
                               restore_rng, seed_all)
from scanclust.step import Batch, TrainStep

log = logging.getLogger("scanclust")


def begin_stage(stage: str, config: Config | str | Path | dict | None, out: str | Path,
                overrides: list[str] | dict[str, Any] | None, resume: bool, force: bool,
                needs: str | None = None) -> tuple[Config, RunDir, str]:
    """Resolve the config, take the run directory, and decide how ``stage`` proceeds.

    Returns ``(config, run, status)`` with status ``fresh``, ``resume`` or ``done`` (see
    ``RunDir.plan``). Everything that can refuse the call comes first: the config, the device,
    the lock (another process at work), the inputs' lineage, a resume under a changed config,
    and, before pretext trains, the limits of the later stages. Only then is any file written,
    so a refused call changes nothing. The lock is held until the stage function returns
    (``rundir.exclusive``) or the process ends.

    Under torchrun every process reads the config and joins the process group here; the main
    process alone takes the lock, plans and prepares the run directory, and hands the decision
    (or the refusal) to the others.
    """
    run = RunDir(out)
    if config is None:
        if not run.config_path.is_file():
            raise ConfigError(f"no config given and {run.config_path} does not exist")
        config = run.config_path
    cfg = load_config(config, overrides)
    distributed.setup(resolve_device(cfg.device))
    for name in ("pretext", "scan", "selflabel"):
        distributed.check_batch_size(getattr(cfg, name).batch_size, f"{name}.batch_size")

    def prepare() -> str:
        run.lock()
        settings = cfg.to_dict()
        status, notes = run.plan(stage, settings, resume, force, needs=needs)
        for note in notes:
            log.warning("warning: %s", note)
        if stage == "pretext" and status != "done" and cfg.pretext.method == "simclr":
            preflight(cfg)
        run.start(stage, status, settings)
        return status

    status = distributed.on_main(prepare)
    if status == "done":
        log.info("%s: already done in %s", stage, run.root)
    return cfg, run, status


StageBody = Callable[[Config, RunDir, str, torch.device], dict[str, Any]]


def stage(name: str, needs: str | None = None) -> Callable[[StageBody], Callable[..., dict]]:
    """A stage function ``name(config=None, out="runs/default", *, overrides=None,
    resume=False, force=False) -> summary`` around ``body(cfg, run, status, device)``: the
    run directory taken and the stage planned first (``begin_stage``), a finished stage's
    summary returned as it is, the lock held until the outermost stage function returns."""

    def decorate(body: StageBody) -> Callable[..., dict]:
        @exclusive
        def function(config: Config | str | Path | dict | None = None,
                     out: str | Path = "runs/default", *,
                     overrides: list[str] | dict[str, Any] | None = None, resume: bool = False,
                     force: bool = False) -> dict[str, Any]:
            cfg, run, status = begin_stage(name, config, out, overrides, resume, force, needs)
            if status == "done":
                return run.summary(name)
            return body(cfg, run, status, resolve_device(cfg.device))

        for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
            setattr(function, attr, getattr(body, attr))
        return function

    return decorate


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig,
                    impl: str = "auto") -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over the trainable parameters.

    ``impl`` picks the kernel: ``fused`` (one kernel for all parameters), ``foreach`` (batched
    per-tensor ops), ``loop`` (one tensor at a time), ``auto`` (torch's default for the device).
    The update is the same up to float rounding.
    """
    params = [p for p in params if p.requires_grad]
    kernel = {"auto": {}, "fused": {"fused": True}, "foreach": {"foreach": True},
              "loop": {"foreach": False}}[impl]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov, **kernel)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kernel)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kernel)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: constant, or cosine from lr to lr * final_lr_factor."""
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    floor = cfg.final_lr_factor
    total = max(total_steps, 1)

    def cosine(step: int) -> float:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def prepare_model(model: nn.Module, cfg: Config, device: torch.device, *, train: bool = False,
                  sync_batchnorm: bool = False) -> nn.Module:
    """Move to the device (NHWC weights with ``perf.channels_last``, on a CPU for inference
    only: ``runtime.channels_last``); return the callable to train with, compiled when
    ``perf.compile=model``. State dicts are always taken from ``model``.

    With ``train`` and several processes the callable is the model under
    DistributedDataParallel (``distributed.wrap``; SyncBatchNorm with ``sync_batchnorm``).

    ``perf.cudnn_benchmark`` lets cuDNN time its convolution algorithms once per shape; every
    training batch has one shape (the last partial batch is dropped), so that pays.
    """
    torch.backends.cudnn.benchmark = cfg.perf.cudnn_benchmark
    model.to(device)
    if channels_last(cfg, device, train):
        model.to(memory_format=torch.channels_last)
    forward = distributed.wrap(model, device, sync_batchnorm) if train else model
    return torch.compile(forward) if COMPILE_SCOPES[cfg.perf.compile] == "model" else forward


def checkpoint_due(epoch: int, last: bool, every: int) -> bool:
    """Whether a stage writes its checkpoint after ``epoch`` (counted from 1): every ``every``
    epochs and after the last. A checkpoint of a ResNet-18 with its optimizer is about 90 MB;
    written and synced after each of a few hundred short GPU epochs, it costs more than they do."""
    return last or epoch % every == 0


def progress(iterable: Iterable, enabled: bool, desc: str, total: int | None = None) -> Iterator:
    """A progress bar on a terminal; nothing when ``enabled`` is off or output is a file/pipe."""
    shown = enabled and distributed.is_main()
    return iter(tqdm(iterable, desc=desc, total=total, disable=None if shown else True,
                     leave=False, dynamic_ncols=True))


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict, for 'best so far' snapshots."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class Loop:
    """The epochs of one training stage (``stage`` names its config section: epochs, batch
    size, optimiser). ``body`` is the stage's step (see ``step.py``), ``samples`` the number
    of training samples an epoch draws batches from."""

    def __init__(self, stage: str, cfg: Config, run: RunDir, model: nn.Module,
                 body: Callable[[Batch], Batch], data: DataPath, augment: Augment, samples: int,
                 device: torch.device) -> None:
        self.stage, self.cfg, self.run, self.model = stage, cfg, run, model
        self.data, self.augment, self.device = data, augment, device
        self.settings = getattr(cfg, stage)
        steps = num_batches(samples, self.settings.batch_size, True)[1]
        self.optimizer = build_optimizer(model.parameters(), self.settings.optim,
                                         cfg.perf.optimizer_impl)
        self.scheduler = build_scheduler(self.optimizer, self.settings.optim,
                                         steps * self.settings.epochs)
        if COMPILE_SCOPES[cfg.perf.compile] == "step":
            body = torch.compile(body)  # backward is a graph break; both halves are compiled
        self.step = TrainStep(body, model.parameters(), device,
                              cfg.perf.cuda_graphs and augment.on_device)
        self.epoch, self.seconds = 0, 0.0

    # --- what a stage may change --------------------------------------------------------------

    def train_mode(self) -> None:
        self.model.train()

    def begin_epoch(self) -> None:
        """Before each epoch's first step (``self.epoch`` is the epoch about to run)."""

    def skip(self, out: Batch) -> bool:
        """Whether a step's result is no update (its batch is then skipped and counted)."""
        return False

    def after_step(self) -> None:
        """After each optimizer step (a moving average of the weights, say)."""

    def epoch_stats(self, loss: torch.Tensor, steps: int, skipped: int) -> dict[str, Any]:
        """The epoch's statistics from the summed step losses (mean over processes)."""
        return {"loss": float(loss) / max(steps, 1)}

    def end_epoch(self, stats: dict[str, Any]) -> dict[str, Any]:
        """What the stage keeps after an epoch; returns the extra fields of its log line."""
        return {}

    def note(self, stats: dict[str, Any], record: dict[str, Any]) -> str:
        """The stage's part of the epoch's console line."""
        return ""

    def stopped(self) -> bool:
        """Whether training ends before the last epoch."""
        return False

    def state(self) -> dict[str, Any]:
        """What the checkpoint holds beside weights, optimiser, schedule, epoch and RNG."""
        return {}

    def load(self, state: dict[str, Any]) -> None:
        """Take back ``state()`` from a checkpoint."""

    # --- the skeleton ---------------------------------------------------------------------

    def fit(self, resume: bool) -> dict[str, Any]:
        """Train from the start, or from the checkpoint with ``resume``; the last epoch's
        statistics."""
        stage, cfg, epochs = self.stage, self.cfg, self.settings.epochs
        if resume:
            self._resume()
        stats: dict[str, Any] = {}
        while self.epoch < epochs and not self.stopped():
            epoch = self.epoch
            seed_all(derive_seed(cfg.seed, stage, epoch))
            self.begin_epoch()
            batches = self.data.batches(self.augment, self.settings.batch_size, shuffle=True,
                                        seed=derive_seed(cfg.seed, stage, "order", epoch),
                                        train=True)
            stats = train_one_epoch(self, batches, f"{stage} {epoch + 1}/{epochs}")
            check_finite(stats, stage, epoch + 1, cfg, self.model)
            self.epoch, self.seconds = epoch + 1, self.seconds + stats["seconds"]
            record = self.end_epoch(stats)
            self.run.log(stage, epoch=self.epoch, lr=self.scheduler.get_last_lr()[0], **record,
                         **stats)
            log.info("%s epoch %d/%d  loss %.4f  %s%.0f img/s (%s data path, %s step)", stage,
                     self.epoch, epochs, stats["loss"], self.note(stats, record),
                     stats["images_per_s"], self.data.name, self.step.mode)
            if checkpoint_due(self.epoch, self.epoch == epochs or self.stopped(),
                              cfg.checkpoint_every):
                self.save()
        if epochs == 0:
            save_checkpoint(self.run.checkpoint(stage), stage, {
                "model": self.model.state_dict(), "epoch": 0, "seconds": 0.0, **self.state(),
                "config": cfg.to_dict()})
        return stats

    def save(self) -> None:
        save_checkpoint(self.run.checkpoint(self.stage), self.stage, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "rng": capture_rng(),
            "seconds": self.seconds, **self.state(), "config": self.cfg.to_dict()})

    def _resume(self) -> None:
        path = self.run.checkpoint(self.stage)
        state = load_checkpoint(path, self.stage)
        distributed.check_resume(state, self.stage)
        load_state(self.model, state["model"], path)
        self.load(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        self.epoch, self.seconds = state["epoch"], state["seconds"]
        log.info("%s: resuming at epoch %d/%d", self.stage, self.epoch, self.settings.epochs)


def train_one_epoch(loop: Loop, batches: Batches, desc: str) -> dict[str, Any]:
    """One pass over ``batches``: step, optimiser step and schedule for each, unless the stage
    skips the batch. Losses are summed on the device; the epoch's only host sync is their
    mean at the end (and whatever ``skip`` reads). Under torchrun ``images`` counts the global
    batches."""
    loop.train_mode()
    total: torch.Tensor | None = None
    steps = skipped = images = 0
    start = time.perf_counter()
    for batch in progress(batches, loop.cfg.progress, desc):
        out = loop.step(batch)
        images += len(batch["index"])
        if loop.skip(out):
            skipped += 1
            continue
        loop.optimizer.step()
        loop.scheduler.step()
        loop.after_step()
        # a replayed graph overwrites its outputs at the next step: sum into a buffer of our own
        total = out["loss"].clone() if total is None else total + out["loss"]
        steps += 1
    if total is None:
        total = torch.zeros((), device=loop.device)
    stats = loop.epoch_stats(distributed.mean_over_processes(total), steps, skipped)
    seconds = time.perf_counter() - start
    images *= distributed.world_size()
    return {**stats, "images_per_s": images / max(seconds, 1e-9), "seconds": seconds}


@torch.no_grad()
def infer(encode: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
          data: DataPath, dataset: Any, batch_size: int, device: torch.device, amp: bool,
          show: bool, desc: str, kind: str = "eval", seed: int = 0,
          store: tuple[torch.device | str, torch.dtype] = ("cpu", torch.float32)
          ) -> tuple[torch.Tensor, ...]:
    """``encode`` applied to the ``kind`` view of every image, in data set order, each of its
    outputs kept on ``store`` = (device, dtype). Under torchrun each process encodes its shard
    and every process receives every row."""
    batches = data.views(dataset, {"image": kind}, batch_size, shuffle=False, seed=seed,
                         train=False, shard=True)
    parts = []
    for batch in progress(batches, show, desc):
        with autocast(device, amp):
            out = encode(batch["image"])
            parts.append([o.to(*store) for o in (out if isinstance(out, tuple) else (out,))])
    return tuple(distributed.gather_rows(torch.cat(column), len(dataset))
                 for column in zip(*parts))


def eval_features(backbone: nn.Module, data: DataPath, dataset: Any, batch_size: int,
                  device: torch.device, amp: bool, show: bool, desc: str,
                  store: tuple[torch.device | str, torch.dtype] = ("cpu", torch.float32)
                  ) -> torch.Tensor:
    """``backbone`` on the eval view of every image, kept on ``store``; inside
    ``frozen_features.remembering()`` computed once for the same weights and inputs."""
    def compute() -> torch.Tensor:
        return infer(backbone, data, dataset, batch_size, device, amp, show, desc, "eval",
                     0, store)[0]

    if not frozen_features.active() or distributed.world_size() > 1:
        return compute()
    first = next(iter(data.views(dataset, {"image": "eval"}, batch_size, shuffle=False,
                                 seed=0, train=False, shard=True)))["image"]
    return frozen_features.features(backbone, first, len(dataset), compute).to(*store)


def predict_logits(model: nn.Module, data: DataPath, dataset: Any, batch_size: int,
                   device: torch.device, amp: bool, show: bool,
                   desc: str = "predict") -> tuple[torch.Tensor, torch.Tensor]:
    """A cluster model's eval-view logits ``[H, N, C]`` and backbone features ``[N, D]`` of a
    whole split, float32 on the CPU."""
    model.eval()
    if frozen_features.active():
        features = eval_features(model.backbone, data, dataset, batch_size, device, amp, show,
                                 desc)
        with torch.no_grad(), autocast(device, amp):
            logits = torch.cat([model.forward_heads(part.to(device)).float().cpu()
                                for part in features.split(4096)], dim=1)
        return logits, features

    def encode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = model.backbone(images)
        return features, model.forward_heads(features).transpose(0, 1)

    features, logits = infer(encode, data, dataset, batch_size, device, amp, show, desc)
    return logits.transpose(0, 1), features


def cache_features(backbone: nn.Module, data: DataPath, dataset: Any, kind: str, views: int,
                   batch_size: int, device: torch.device, amp: bool, seed: int,
                   store: tuple[torch.device, torch.dtype], show: bool) -> torch.Tensor:
    """A frozen backbone's features ``[1 + views, N, D]`` for cached-feature mode
    (``data/pipelines/features.py``): index 0 the eval view, 1.. ``kind`` views, kept on
    ``store`` = (device, dtype) as ``feature_store`` chose. Every process keeps the whole cache
    (a training batch may hold any sample)."""
    backbone.eval()
    out: torch.Tensor | None = None
    for v in range(views + 1):
        if v == 0 and frozen_features.active():
            features = eval_features(backbone, data, dataset, batch_size, device, amp, show,
                                     f"features view 0/{views}", store)
        else:
            (features,) = infer(backbone, data, dataset, batch_size, device, amp, show,
                                f"features view {v}/{views}", "eval" if v == 0 else kind,
                                derive_seed(seed, "cache", v), store)
        if out is None:
            out = torch.empty(views + 1, *features.shape, dtype=store[1], device=store[0])
        out[v] = features
    assert out is not None
    return out


def feature_path(backbone: nn.Module, cfg: Config, data: DataPath, dataset: Any, kind: str,
                 views: int, device: torch.device,
                 store: tuple[torch.device, torch.dtype] | None = None) -> FeaturePath:
    """``dataset`` as cached features of ``backbone``: the eval view and ``views`` views of
    ``kind``, kept where ``feature_store`` says (or on ``store``)."""
    store = store or feature_store(cfg.perf.device_data_gb, views, len(dataset),
                                   backbone.out_dim, device)
    features = cache_features(backbone, data, dataset, kind, views, cfg.evaluate.batch_size,
                              device, cfg.amp, cfg.seed, store, cfg.progress)
    return FeaturePath(features, torch.from_numpy(dataset.targets).to(store[0]), device)
