"""All stages in order, once or over several seeds (the paper reports mean and std of 10 runs)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from scanclust.config import Config, ConfigError, load_config
from scanclust.metrics import mean_std
from scanclust.files import read_json, write_json
from scanclust.rundir import RunDir, exclusive
from scanclust.runtime import resolve_device
from scanclust.stages.evaluate import evaluate
from scanclust.stages.mine import mine
from scanclust.stages.pretext import pretext
from scanclust.stages.scan import scan
from scanclust.stages.selflabel import selflabel

log = logging.getLogger("scanclust")

STAGE_FUNCTIONS = {"pretext": pretext, "mine": mine, "scan": scan, "selflabel": selflabel,
                   "evaluate": evaluate}


def run(config: Config | str | Path | dict | None = None, out: str | Path = "runs/default", *,
        overrides: list[str] | dict[str, Any] | None = None, resume: bool = False,
        force: bool = False, seeds: int = 1) -> dict[str, Any]:
    """pretext -> mine -> scan -> selflabel -> evaluate; returns metrics (or their summary).

    With ``seeds > 1`` each repetition runs in ``<out>/seed_<i>`` with ``seed + i``, and
    ``<out>/summary.json`` holds the mean and std of every metric over the repetitions.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: needs at least 1 seed")
    if seeds == 1:
        return _run_once(config, Path(out), overrides, resume, force)
    base = load_config(config if config is not None else Path(out) / "seed_0" / "config.yaml",
                       overrides)
    configs = [load_config(base, {"seed": base.seed + i}) for i in range(seeds)]  # all valid?
    runs = [_run_once(cfg, Path(out) / f"seed_{i}", None, resume, force)
            for i, cfg in enumerate(configs)]
    summary = {"dataset": base.data.dataset, "seeds": [base.seed + i for i in range(seeds)],
               "runs": [str(Path(out) / f"seed_{i}") for i in range(seeds)],
               "mean_std": mean_std([{k: r[k] for k in ("stages", "neighbors", "seconds")}
                                     for r in runs])}
    write_json(Path(out) / "summary.json", summary)
    log.info("%d seeds: wrote %s\n%s", seeds, Path(out) / "summary.json", format_summary(summary))
    return summary


@exclusive
def _run_once(config: Config | str | Path | dict | None, out: Path,
              overrides: list[str] | dict[str, Any] | None, resume: bool,
              force: bool) -> dict[str, Any]:
    """Every stage, under one lock; each stage's refusal is checked before the first runs, so
    a refused call writes nothing."""
    cfg = load_config(config if config is not None else out / "config.yaml", overrides)
    run_stages(cfg, out, resume, force)
    return read_json(out / "metrics.json")


def run_stages(cfg: Config, out: Path, resume: bool, force: bool,
               before_scan: Callable[[Config], Config] | None = None) -> None:
    """The stage loop of ``run`` and ``cluster``: the run directory locked for all stages, every
    stage planned (and a refusal raised) before the first one works, then each in order.
    ``before_scan`` may settle settings that need mining's output (``cluster``'s K)."""
    resolve_device(cfg.device)
    run_dir = RunDir(out)
    run_dir.lock()
    settings = cfg.to_dict()
    will_run: set[str] = set()
    for name in STAGE_FUNCTIONS:
        status, _ = run_dir.plan(name, settings, resume, force, frozenset(will_run))
        if status != "done":
            will_run.add(name)
    for name, stage in STAGE_FUNCTIONS.items():
        if name == "scan" and before_scan is not None:
            cfg = before_scan(cfg)
        started = time.perf_counter()
        stage(cfg, out, resume=resume, force=force)
        if name in will_run:
            log.info("%s finished in %.1f s", name, time.perf_counter() - started)


def format_summary(summary: dict[str, Any]) -> str:
    """mean ± std of ACC / NMI / ARI per stage over the seeds."""
    stats = summary["mean_std"].get("stages", {})
    lines = [f"{'':10s} {'ACC':>15s} {'NMI':>15s} {'ARI':>15s}"]
    for name in ("kmeans", "scan", "selflabel"):
        row = stats.get(name)
        if not row:
            continue
        cells = " ".join(f"{row[k]['mean']:7.4f}±{row[k]['std']:.4f}" if k in row else f"{'-':>15s}"
                         for k in ("acc", "nmi", "ari"))
        lines.append(f"{name:10s} {cells}")
    return "\n".join(lines)
