"""Learning-rate schedules."""

from __future__ import annotations

import pytest
import torch

from scanclust.config import OptimConfig
from scanclust.engine import build_scheduler


def _lrs(cfg: OptimConfig, total_steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    lrs = []
    for _ in range(total_steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_schedule_start_middle_end() -> None:
    cfg = OptimConfig(name="sgd", lr=0.4, schedule="cosine", final_lr_factor=1e-3)
    lrs = _lrs(cfg, total_steps=10)
    assert lrs[0] == pytest.approx(0.4)
    # half way cos(pi/2) = 0: lr * (f + (1 - f) / 2) = 0.4 * 0.5005 = 0.2002
    assert lrs[5] == pytest.approx(0.4 * (1e-3 + (1 - 1e-3) / 2))
    assert lrs[10] == pytest.approx(0.4 * 1e-3)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_constant_schedule() -> None:
    cfg = OptimConfig(lr=1e-4, schedule="constant")
    assert _lrs(cfg, total_steps=5) == pytest.approx([1e-4] * 6)
