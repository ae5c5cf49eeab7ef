"""``scanclust demo``: the whole pipeline on scikit-learn's digits, on the CPU, offline.

The paper's Table 1 in miniature: k-means on the pretext features, then SCAN, then
self-labelling, each row measured on the held-out 20 % of the digits.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from scanclust import distributed
from scanclust.config import ConfigError
from scanclust.stages.evaluate import format_table
from scanclust.pipeline import format_summary, run

DEFAULT_OUT = Path("runs/demo")


def free_run_dir(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``... : a demo never writes over an earlier one."""
    if not base.exists():
        return base
    i = 2
    while base.with_name(f"{base.name}-{i}").exists():
        i += 1
    return base.with_name(f"{base.name}-{i}")


def demo(out: str | Path | None = None, *, seeds: int = 1,
         overrides: list[str] | dict[str, Any] | None = None, resume: bool = False,
         force: bool = False) -> dict[str, Any]:
    """Run the demo config end to end; prints the results table and returns the metrics."""
    if out is None and distributed.launched():
        # each process would look for a free folder on its own, and might find another one
        raise ConfigError("under torchrun the demo needs --out: the processes must share it")
    target = Path(out) if out is not None else free_run_dir(DEFAULT_OUT)
    start = time.perf_counter()
    result = run("demo", target, overrides=overrides, resume=resume, force=force, seeds=seeds)
    total = time.perf_counter() - start
    table = format_summary(result) if seeds > 1 else format_table(result)
    if distributed.is_main():
        print(f"\nscanclust demo: digits (8x8, upsampled to 16x16), tiny ResNet, CPU-sized "
              f"schedule\n{table}\ntotal {total:.1f} s; metrics and figures in {target}")
    return result
