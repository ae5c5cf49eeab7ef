"""The run directory: every file a run writes, and the guard that keeps finished work safe.

    <run>/config.yaml               the resolved config of the latest stage started
    <run>/pretext/checkpoint.pt     one checkpoint per training stage (resume + final weights)
    <run>/neighbors/{train,val}.npy top-K neighbour indices, int64 [N, K]
    <run>/neighbors/features_{train,val}.npy  mining features, float16 (k-means baseline)
    <run>/neighbors/purity.json
    <run>/scan/checkpoint.pt
    <run>/selflabel/checkpoint.pt
    <run>/metrics.json, <run>/figures/, <run>/log.jsonl (one line per epoch per stage)

Stages talk through these files only, so any stage can be rerun, resumed or inspected alone.
With several processes (torchrun) only the main one writes: the writing functions below and
``checkpoint.save_checkpoint`` do nothing in the others, which read the files after a barrier.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from scanclust import distributed
from scanclust.errors import UserError

STAGES = ("pretext", "mine", "scan", "selflabel", "evaluate")
STAGE_DIRS = {"pretext": "pretext", "mine": "neighbors", "scan": "scan", "selflabel": "selflabel"}


class RunDirError(UserError, RuntimeError):
    """The run directory is not in the state the requested stage needs."""


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def stage_dir(self, stage: str) -> Path:
        return self.root / STAGE_DIRS[stage]

    def checkpoint(self, stage: str) -> Path:
        return self.stage_dir(stage) / "checkpoint.pt"

    def summary_path(self, stage: str) -> Path:
        """Small JSON a finished stage writes: its seconds and headline numbers."""
        return self.stage_dir(stage) / "summary.json"

    def neighbors(self, split: str) -> Path:
        return self.stage_dir("mine") / f"{split}.npy"

    def features(self, split: str) -> Path:
        return self.stage_dir("mine") / f"features_{split}.npy"

    def is_done(self, stage: str) -> bool:
        return self.summary_path(stage).is_file()

    def require(self, stage: str, needed_by: str) -> None:
        if not self.is_done(stage):
            raise RunDirError(f"{needed_by} needs the {stage} stage's output in {self.root}; "
                              f"run `scanclust {stage}` on this run directory first")

    def prepare(self, stage: str, resume: bool, force: bool) -> str:
        """Decide whether ``stage`` starts fresh, resumes, or is already done.

        Without ``resume`` a stage never writes over an earlier result; with ``force`` the old
        output is renamed aside (``scan.old-<time>``), not deleted.
        """
        folder = self.stage_dir(stage)
        has_output = folder.is_dir() and any(folder.iterdir())
        if not has_output:
            folder.mkdir(parents=True, exist_ok=True)
            return "fresh"
        if force:
            aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(folder, aside)
            folder.mkdir(parents=True)
            return "fresh"
        if resume:
            return "done" if self.is_done(stage) else "resume"
        state = "a finished" if self.is_done(stage) else "an unfinished"
        raise RunDirError(f"{folder} already holds {state} {stage} stage; pass --resume to "
                          f"continue or keep it, --force to redo it (old output is kept aside), "
                          f"or choose another run directory")

    def finish(self, stage: str, summary: dict[str, Any]) -> None:
        """Mark ``stage`` done with its ``summary``, which gains the number of processes."""
        summary["world_size"] = distributed.world_size()
        write_json(self.summary_path(stage), summary)

    def summary(self, stage: str) -> dict[str, Any]:
        return read_json(self.summary_path(stage))

    def save_array(self, path: Path, array: np.ndarray) -> None:
        if distributed.is_main():
            np.save(path, array)

    def log(self, stage: str, **record: Any) -> None:
        if not distributed.is_main():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"stage": stage, "time": round(time.time(), 3), **_finite(record)})
        with open(self.root / "log.jsonl", "a") as handle:
            handle.write(line + "\n")


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write, so readers of metrics.json never see half a file."""
    if not distributed.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
