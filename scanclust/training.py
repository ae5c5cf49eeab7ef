"""What the three training stages share: setup, optimisers, schedules, batches on the device."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from scanclust import distributed
from scanclust.config import Config, ConfigError, OptimConfig, load_config
from scanclust.preflight import preflight
from scanclust.rundir import RunDir
from scanclust.runtime import channels_last, resolve_device

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
    ``perf.compile``. State dicts are always taken from ``model``.

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
    return torch.compile(forward) if cfg.perf.compile else forward


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
