"""The run directory: every file a run writes, its one-writer lock, and what each stage was built from.

    <run>/config.yaml               the resolved config of the latest stage started
    <run>/pretext/checkpoint.pt     one checkpoint per training stage (resume + final weights)
    <run>/neighbors/{train,val}.npy top-K neighbour indices, int64 [N, K]
    <run>/neighbors/features_{train,val}.npy  mining features, float16 (k-means baseline)
    <run>/neighbors/purity.json
    <run>/scan/checkpoint.pt
    <run>/selflabel/checkpoint.pt
    <run>/<stage>/lineage.json      hashes of the inputs it was built from, its config, the image
                                    files it read (folder and ImageNet data sets), its output files
    <run>/<stage>/images-<key>.npy  per image file read: path hash, size, mtime (for the messages)
    <run>/metrics.json, <run>/figures/, <run>/log.jsonl (one line per epoch per stage)
    <run>/.lock                     while a process works on the run: its PID

Stages talk through these files only, so any stage can be rerun, resumed or inspected alone.
Three rules keep the folder from ever holding a mix of results, each in a module of its own:

- One writer (``lock.py``): a process takes the lock before it reads the state; a second
  one is refused with the holder's PID, and a killed holder's lock is taken over.
- Lineage (``lineage.py``): a stage records what it was built from (its inputs' outputs, the
  image files it read) and what it wrote; a stage whose input changed since is refused, and
  so is every stage built on it, naming the earliest stage to redo with ``--force``.
- Atomic files (``files.py``): everything is written to a temporary file and renamed; the
  temporary files of a killed process are removed by the next one that takes the lock.

Every write goes through ``RunDir`` or ``atomic_write`` (which ``save_checkpoint`` and the figures
use). With several processes (torchrun) only the main one writes: ``RunDir.lock``,
``RunDir.log`` and ``atomic_write`` do nothing in the others, and ``engine.begin_stage`` runs
the planning (``plan``, ``start``) in the main process alone (``distributed.on_main``); the
others read the files after a barrier.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from scanclust import distributed, lock
from scanclust.files import RunDirError, atomic_write, file_digest, finite, read_json, write_json
from scanclust.lineage import (INPUTS, LINEAGE_NAME, OUTPUTS, STAGE_DIRS, STAGES, Lineage,
                               compare_configs)
from scanclust.lock import exclusive

__all__ = ["INPUTS", "OUTPUTS", "STAGES", "STAGE_DIRS", "RunDir", "RunDirError", "atomic_write",
           "compare_configs", "exclusive", "file_digest", "read_json", "write_json"]


class RunDir(Lineage):
    """A run directory's paths and files; ``Lineage`` adds the checks of what built them."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._verified: set[str] = set()

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def log_path(self) -> Path:
        return self.root / "log.jsonl"

    def stage_dir(self, stage: str) -> Path:
        return self.root / STAGE_DIRS[stage]

    def checkpoint(self, stage: str) -> Path:
        return self.stage_dir(stage) / "checkpoint.pt"

    def summary_path(self, stage: str) -> Path:
        """Small JSON a finished stage writes: its seconds and headline numbers."""
        return self.stage_dir(stage) / "summary.json"

    def lineage_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / LINEAGE_NAME

    def neighbors(self, split: str) -> Path:
        return self.stage_dir("mine") / f"{split}.npy"

    def features(self, split: str) -> Path:
        return self.stage_dir("mine") / f"features_{split}.npy"

    def is_done(self, stage: str) -> bool:
        return stage in STAGE_DIRS and self.summary_path(stage).is_file()

    def state(self, stage: str) -> str:
        """``done``, ``unfinished`` (a checkpoint to resume from), ``partial`` (leftovers of a
        stage killed before its first checkpoint: nothing worth keeping) or ``none``."""
        folder = self.stage_dir(stage)
        if self.is_done(stage):
            return "done"
        if stage != "mine" and self.checkpoint(stage).is_file():
            return "unfinished"
        if folder.is_dir() and any(folder.iterdir()):
            return "partial"
        return "none"

    def lock(self) -> None:
        """Make this process the run directory's only writer (``lock.take``); taken again by
        the same process, it is a no-op. Taking it removes what a killed writer left."""
        if lock.take(self.root):
            self._remove_orphans()

    def release(self) -> None:
        lock.release(self.root)

    def _remove_orphans(self) -> None:
        """Temporary files of a process killed while writing: never complete, never read."""
        folders = [self.root, self.figures, *(self.root / d for d in STAGE_DIRS.values()),
                   self.root / "cache"]  # cache: ``data/cache.py``'s decodes
        for folder in filter(Path.is_dir, folders):
            for tmp in [*folder.glob(".*.tmp"), *folder.glob(".*.partial")]:
                tmp.unlink(missing_ok=True)

    def start(self, stage: str, status: str, cfg: dict[str, Any]) -> None:
        """Make the stage folder ready after ``plan`` cleared it, and record the config.

        fresh: earlier output moves to ``<folder>.old-<time>`` (with its log lines), leftovers
        of a stage killed before its first checkpoint are removed, and the lineage records the
        inputs' hashes. resume: log lines after the checkpoint's epoch (written before a kill)
        are dropped.
        """
        if stage in STAGE_DIRS and status == "fresh":
            read = self._read_by(stage, cfg)  # a folder that cannot be listed: nothing moved
            folder = self.stage_dir(stage)
            state = self.state(stage)
            dropped = self._trim_log(stage, 0)
            if state in ("done", "unfinished"):
                aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
                while aside.exists():  # redone twice within a second
                    aside = aside.with_name(aside.name + "+")
                os.replace(folder, aside)
                if dropped:
                    (aside / "log.jsonl").write_text("".join(dropped))
            elif folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            inputs = {dep: self.output_digest(dep) for dep in INPUTS[stage]}
            for key, current in read.items():  # each file's row, for the messages
                self.save_array(self._table_path(stage, key), current.table)
            data = {key: current.record() for key, current in read.items()}
            write_json(self.lineage_path(stage), {"inputs": inputs, "config": cfg,
                                                  **({"data": data} if data else {})})
        elif stage in STAGE_DIRS and status == "resume":
            # here, not at the top: the command line's answers to bad input come before torch
            from scanclust.checkpoint import checkpoint_epoch

            self._trim_log(stage, checkpoint_epoch(self.checkpoint(stage)))
            write_json(self.lineage_path(stage), {**self.lineage(stage), "config": cfg})
        if status != "done":
            self.write_text(self.config_path,
                            yaml.safe_dump(self._as_kept(cfg), sort_keys=False))

    def finish(self, stage: str, summary: dict[str, Any]) -> None:
        """Record the output's hash, then the summary that marks the stage finished (with the
        number of processes that made it)."""
        path = self.lineage_path(stage)
        recorded = read_json(path) if path.is_file() else {}
        write_json(path, {**recorded, "output": self.output_digest(stage),
                          "files": self.output_files(stage)})
        summary["world_size"] = distributed.world_size()
        write_json(self.summary_path(stage), summary)

    def summary(self, stage: str) -> dict[str, Any]:
        return read_json(self.summary_path(stage))

    def log(self, stage: str, **record: Any) -> None:
        if not distributed.is_main():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"stage": stage, "time": round(time.time(), 3), **finite(record)},
                          allow_nan=False)
        with open(self.log_path, "a") as handle:
            handle.write(line + "\n")

    def _trim_log(self, stage: str, keep_epochs: int) -> list[str]:
        """Drop the stage's lines after epoch ``keep_epochs`` (all of them for 0), and any line
        torn by a kill; returns the dropped lines of the stage."""
        if not self.log_path.is_file():
            return []
        kept, dropped = [], []
        for line in self.log_path.read_text().splitlines(keepends=True):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            ours = record.get("stage") == stage and (keep_epochs == 0 or
                                                     record.get("epoch", 0) > keep_epochs)
            (dropped if ours else kept).append(line if line.endswith("\n") else line + "\n")
        self.write_text(self.log_path, "".join(kept))
        return dropped

    def save_array(self, path: Path, array: np.ndarray) -> None:
        with atomic_write(path) as handle:
            np.save(handle, array)

    def write_text(self, path: Path, text: str) -> None:
        with atomic_write(path) as handle:
            handle.write(text.encode())
