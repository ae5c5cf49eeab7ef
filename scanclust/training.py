"""What the three training stages share: setup, optimisers, schedules, batches on the device."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from scanclust.config import Config, ConfigError, OptimConfig, load_config, save_config
from scanclust.rundir import RunDir

log = logging.getLogger("scanclust")


def setup_run(config: Config | str | Path | dict | None, out: str | Path,
              overrides: list[str] | dict[str, Any] | None = None) -> tuple[Config, RunDir]:
    """Resolve the config (falling back to the run's own config.yaml) and record it in the run."""
    run = RunDir(out)
    if config is None:
        if not run.config_path.is_file():
            raise ConfigError(f"no config given and {run.config_path} does not exist")
        config = run.config_path
    cfg = load_config(config, overrides)
    run.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.config_path)
    return cfg, run


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def progress(iterable: Iterable, enabled: bool, desc: str, total: int | None = None) -> Iterator:
    """A progress bar on a terminal; nothing when ``enabled`` is off or output is a file/pipe."""
    return iter(tqdm(iterable, desc=desc, total=total, disable=None if enabled else True,
                     leave=False, dynamic_ncols=True))


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict, for 'best so far' snapshots."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
