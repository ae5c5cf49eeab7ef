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
Three rules keep the folder from ever holding a mix of results:

- One writer. A process takes the lock (a POSIX record lock, ``fcntl.lockf``) before it reads
  the state; a second process is refused with the holder's PID. The kernel drops the lock of a
  killed process, so a stale lock file is simply taken over. (A record lock belongs to the
  process, not to its forked data-loader workers, so it ends with the process itself.)
- Lineage. A stage records a content hash of each input stage's output and a fingerprint of
  the image files it reads (``data/fingerprint.py``) when it starts, and the hashes of its own
  output files when it finishes. A stage whose input changed since (a redone pretext, a
  checkpoint copied in from another run, images replaced, added or removed) is refused, and so
  is every stage built on it, naming the earliest stage to redo with ``--force``. A lineage
  written before fingerprints existed has none: its images are not compared.
- Atomic files. Everything is written to a temporary file and renamed; the temporary files of
  a killed process are removed by the next one that takes the lock.

Every write goes through ``RunDir`` or ``atomic_write`` (which ``save_checkpoint`` and the figures
use). With several processes (torchrun) only the main one writes: ``RunDir.lock``,
``RunDir.log`` and ``atomic_write`` do nothing in the others, and ``training.begin_stage`` runs
the planning (``plan``, ``start``) in the main process alone (``distributed.on_main``); the
others read the files after a barrier.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import math
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
import yaml

from scanclust import distributed
from scanclust.config import ConfigError, DataConfig
from scanclust.data.fingerprint import IMAGENET, Fingerprint, difference, fingerprint, sources
from scanclust.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: runs go unlocked, with a warning
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("scanclust")

STAGES = ("pretext", "mine", "scan", "selflabel", "evaluate")
STAGE_DIRS = {"pretext": "pretext", "mine": "neighbors", "scan": "scan", "selflabel": "selflabel"}
# The stages whose output a stage reads; evaluate reads scan and self-label only where finished.
INPUTS = {"pretext": (), "mine": ("pretext",), "scan": ("pretext", "mine"), "selflabel": ("scan",),
          "evaluate": ("mine", "scan", "selflabel")}
OPTIONAL_INPUTS = {"evaluate": ("scan", "selflabel")}
# The splits whose images a stage reads (pretext only when it trains: see ``_reads``); evaluate
# and report record nothing, they are redone every time.
READS = {"pretext": ("train",), "mine": ("train", "val"), "scan": ("train", "val"),
         "selflabel": ("train",)}
OUTPUTS = {"pretext": ("checkpoint.pt",), "scan": ("checkpoint.pt",),
           "selflabel": ("checkpoint.pt",),
           "mine": ("train.npy", "val.npy", "features_train.npy", "features_val.npy",
                    "targets_train.npy", "targets_val.npy")}

# Config keys that change what a stage computes. ``--resume`` keeps or continues a stage only if
# these match the config it was made with; every other key (device, progress, perf.*, the
# evaluation settings, the keys of other stages) may change between calls.
_DATA = ("seed", "data.dataset", "data.root", "data.image_size", "data.resize", "data.mean",
         "data.std", "data.max_images", "model.backbone", "model.width")
RESULT_KEYS = {
    "pretext": _DATA + ("augment.simclr.", "model.proj_hidden", "model.proj_dim", "pretext."),
    "mine": _DATA + ("data.val_root", "model.proj_hidden", "model.proj_dim", "mine.topk",
                     "mine.features"),
    "scan": _DATA + ("data.val_root", "augment.", "model.num_clusters", "scan."),
    "selflabel": _DATA + ("augment.", "selflabel."),
}
# Data sets torchvision verifies by checksum: where they are stored cannot change a result.
CHECKSUMMED = ("cifar10", "cifar20", "stl10", "digits")
LOCK_NAME = ".lock"
LINEAGE_NAME = "lineage.json"

# Locks this process holds: resolved root -> (file descriptor, whether we created the root).
_HELD: dict[str, tuple[int, bool]] = {}
# sha256 of files already hashed, keyed by identity and version, so one call hashes a file once.
_DIGESTS: dict[tuple[str, int, int, int], str] = {}
# Fingerprints of the image folders, by (data set, folder, key): listed once while this process
# holds a run directory's lock, so every stage of one call compares against the same listing.
_FOLDERS: dict[tuple[str, str, str], Fingerprint] = {}


class RunDirError(UserError, RuntimeError):
    """The run directory is not in the state the requested stage needs."""


class RunDir:
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

    # --- the lock ---------------------------------------------------------------------------

    def lock(self) -> None:
        """Make this process the run directory's only writer until ``release`` (or its end).

        Taken again by the same process, it is a no-op. The root is created here, so a missing
        or read-only parent is reported before any work starts.
        """
        key = str(self.root.resolve())
        if key in _HELD or not distributed.is_main():
            return
        created = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"cannot create run directory {self.root}: "
                              f"{err.strerror or err}") from None
        path = self.root / LOCK_NAME
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                _remove_if_empty(self.root, created)
                raise RunDirError(f"cannot write to run directory {self.root}: "
                                  f"{err.strerror or err}") from None
            if fcntl is None:
                log.warning("no file locking on this platform: nothing stops a second process "
                            "from writing to %s at the same time", self.root)
                break
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EACCES, errno.EAGAIN):
                    # a file system without locks: go on, but say so
                    log.warning("cannot lock %s (%s): nothing stops a second writer", path,
                                err.strerror)
                    break
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirError(
                    f"{self.root} is in use by process {holder}; wait for it to end or stop it "
                    f"(a lock left by a killed process is taken over automatically)") from None
            try:  # the holder may have removed the file between our open and our lock
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[key] = (fd, created)
        self._remove_orphans()

    def release(self) -> None:
        _release(str(self.root.resolve()))

    def _remove_orphans(self) -> None:
        """Temporary files of a process killed while writing: never complete, never read."""
        folders = [self.root, self.figures] + [self.root / d for d in STAGE_DIRS.values()]
        for folder in folders + [self.root / "cache"]:  # cache: ``data/cache.py``'s decodes
            if folder.is_dir():
                for tmp in [*folder.glob(".*.tmp"), *folder.glob(".*.partial")]:
                    tmp.unlink(missing_ok=True)

    # --- lineage: what each stage was built from --------------------------------------------

    def output_digest(self, stage: str) -> str:
        """sha256 over the stage's output files: what a later stage was built from."""
        total = hashlib.sha256()
        for name, digest in self.output_files(stage).items():
            total.update(f"{name}:{digest}\n".encode())
        return total.hexdigest()

    def output_files(self, stage: str) -> dict[str, str]:
        """sha256 of each output file the stage folder holds."""
        folder = self.stage_dir(stage)
        return {name: file_digest(folder / name) for name in OUTPUTS[stage]
                if (folder / name).is_file()}

    def lineage(self, stage: str) -> dict[str, Any]:
        path = self.lineage_path(stage)
        try:
            return read_json(path)
        except (OSError, RunDirError):
            raise RunDirError(
                f"{self.stage_dir(stage)} has no readable {LINEAGE_NAME}, so what it was built "
                f"from is unknown (made by an older scanclust?); redo it with "
                f"{self._redo(stage)}") from None

    def _redo(self, stage: str) -> str:
        later = ", then the stages after it" if stage not in ("selflabel", "evaluate") else ""
        return (f"`scanclust {stage} --out {self.root} --force` (its old output is kept "
                f"aside){later}")

    def _stale(self, stage: str, dep: str, why: str) -> RunDirError:
        return RunDirError(f"{self.stage_dir(stage)} was built from another {dep} output than "
                           f"the one in {self.stage_dir(dep)} ({why}); redo it with "
                           f"{self._redo(stage)}")

    def verify(self, stage: str) -> None:
        """A finished stage is intact: its output is the one it wrote, built from the current
        output of every input stage (checked back to pretext).

        Every input is verified before any hash is compared, so a refusal names the earliest
        stage to redo (after ``pretext --force``: mine, not scan).
        """
        if stage in self._verified:
            return
        recorded = self.lineage(stage)
        for dep in INPUTS[stage]:
            self.verify(dep)
        for dep in INPUTS[stage]:
            if recorded.get("inputs", {}).get(dep) != self.output_digest(dep):
                raise self._stale(stage, dep, f"{dep} was redone or replaced since")
        if recorded.get("output") != self.output_digest(stage):
            raise RunDirError(f"{self.stage_dir(stage)}: {self._what_changed(stage, recorded)}; "
                              f"redo it with {self._redo(stage)}")
        self._verified.add(stage)

    def _what_changed(self, stage: str, recorded: dict[str, Any]) -> str:
        """The output files that differ from those the stage wrote; all of them where the
        lineage predates per-file hashes."""
        names, now, then = OUTPUTS[stage], self.output_files(stage), recorded.get("files")
        changed = missing = []
        if isinstance(then, dict):
            changed = [n for n in names if n in now and now[n] != then.get(n)]
            missing = [n for n in names if n in then and n not in now]
        if not changed and not missing:
            changed, missing = (list(names), []) if names[0] in now else ([], list(names))
        parts = []
        if changed:
            parts.append(f"{', '.join(changed)} changed after the {stage} stage wrote "
                         f"{'it' if len(changed) == 1 else 'them'} (replaced by hand, or copied "
                         f"from another run?)")
        if missing:
            parts.append(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
        return "; ".join(parts)

    # --- the images a stage read -------------------------------------------------------------

    def data_change(self, stages: set[str] | frozenset[str], cfg: dict[str, Any]
                    ) -> tuple[str, str, str] | None:
        """The earliest of ``stages`` that read other image files than ``cfg``'s folders hold
        now: ``(stage, folder setting, what changed)``, e.g. ``("pretext", "data.root=/x",
        "4 files changed, 1 added, 0 removed")``; None when all match (or none was recorded)."""
        data = _data_config(cfg)
        if data is None:
            return None
        now = {**sources(data, "train"), **sources(data, "val")}
        for stage in (s for s in STAGE_DIRS if s in stages):
            try:
                recorded = read_json(self.lineage_path(stage)).get("data", {})
            except (OSError, RunDirError, AttributeError):
                continue  # the structural checks (``verify``) say what is wrong with it
            for key, then in recorded.items():
                if key not in now:
                    continue  # a folder this config no longer reads: nothing to compare
                current = _fingerprint(data, key)
                if current.sha256 != then.get("sha256"):
                    return stage, _setting(key, data), self._difference(stage, key, then,
                                                                        current)
        return None

    def _difference(self, stage: str, key: str, then: dict[str, Any],
                    current: Fingerprint) -> str:
        try:
            before = np.load(self._table_path(stage, key))
            changed, added, removed = difference(before, current.table)
        except (OSError, ValueError, IndexError):  # the table is gone: counts only
            return f"{_files(then.get('files'))} then, {len(current.table)} now"
        return f"{_files(changed)} changed, {added} added, {removed} removed"

    def _table_path(self, stage: str, key: str) -> Path:
        name = key.removeprefix("data.").replace("/", "-")
        return self.stage_dir(stage) / f"images-{name}.npy"

    def _check_data(self, stages: set[str], cfg: dict[str, Any]) -> None:
        change = self.data_change(stages, cfg)
        if change is not None:
            stage, setting, what = change
            later = ", then the stages after it" if stage != "selflabel" else ""
            raise RunDirError(f"the images under {setting} changed since the {stage} stage read "
                              f"them ({what}); redo the run from {stage}: `scanclust {stage} "
                              f"--out {self.root} --force`{later}")

    def _read_by(self, stage: str, cfg: dict[str, Any]) -> dict[str, Fingerprint]:
        """The fingerprints of the folders ``stage`` reads; {} for the data sets without files
        of their own."""
        data = _data_config(cfg)
        return {} if data is None else {key: _fingerprint(data, key)
                                        for key in _reads(stage, cfg, data)}

    def _upstream(self, inputs: tuple[str, ...], will_run: frozenset[str] | set[str]) -> set[str]:
        """The finished stages ``inputs`` were built from, directly or not, that this call keeps."""
        found: set[str] = set()
        todo = list(inputs)
        while todo:
            dep = todo.pop()
            if dep in found or dep not in STAGE_DIRS:
                continue
            found.add(dep)
            todo += INPUTS[dep]
        return {d for d in found if d not in will_run and self.is_done(d)}

    def plan(self, stage: str, cfg: dict[str, Any], resume: bool, force: bool,
             will_run: frozenset[str] | set[str] = frozenset(),
             needs: str | None = None) -> tuple[str, list[str]]:
        """Decide how ``stage`` proceeds, changing no file: ``(status, warnings)``.

        Status is ``fresh``, ``resume`` or ``done``. Refused (an exception naming the fix): a
        missing or changed input, existing output without ``--resume`` or ``--force``, and a
        resume under a config that changes the stage's result. ``will_run`` names earlier
        stages that the caller runs first (``scanclust run``); their output will change.
        """
        inputs = INPUTS.get(stage, (needs,) if needs else ())
        for dep in reversed(inputs):  # the nearest missing input is the one to run next
            if dep in will_run or self.is_done(dep) or dep in OPTIONAL_INPUTS.get(stage, ()):
                continue
            raise RunDirError(f"{stage} needs the {dep} stage's output in {self.root}; "
                              f"run `scanclust {dep}` on this run directory first")
        # changed images first: they make every stage from the first that read them stale
        self._check_data(self._upstream(inputs, will_run), cfg)
        for dep in reversed(inputs):
            if dep not in will_run and self.is_done(dep):
                self.verify(dep)
        if stage not in STAGE_DIRS:
            return "fresh", []
        state = self.state(stage)
        if force or state in ("none", "partial"):
            return "fresh", []
        if not resume:
            kind = "a finished" if state == "done" else "an unfinished"
            raise RunDirError(f"{self.stage_dir(stage)} already holds {kind} {stage} stage; "
                              f"pass --resume to continue or keep it, --force to redo it (old "
                              f"output is kept aside), or choose another run directory")
        self._check_data({stage}, cfg)
        recorded = self.lineage(stage)
        for dep in INPUTS[stage]:
            if dep in will_run:
                raise self._stale(stage, dep, f"this call redoes or continues {dep}")
            if recorded.get("inputs", {}).get(dep) != self.output_digest(dep):
                raise self._stale(stage, dep, f"{dep} was redone or replaced since")
        if state == "done":
            self.verify(stage)
        notes = compare_configs(stage, recorded.get("config", {}), cfg, state == "done",
                                self.stage_dir(stage))
        return ("done" if state == "done" else "resume"), notes

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
            from scanclust.checkpoint import checkpoint_epoch

            self._trim_log(stage, checkpoint_epoch(self.checkpoint(stage)))
            write_json(self.lineage_path(stage), {**self.lineage(stage), "config": cfg})
        if status != "done":
            self.write_text(self.config_path,
                            yaml.safe_dump(self._as_kept(cfg), sort_keys=False))

    def _as_kept(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """``cfg`` with the epochs each kept finished stage ran with.

        More epochs for a finished stage are not applied (``compare_configs`` warns); written to
        config.yaml they would be the next call's config, and its warning again.
        """
        kept = dict(cfg)
        for stage in ("pretext", "scan", "selflabel"):
            section = kept.get(stage)
            if not isinstance(section, dict) or not self._kept(stage):
                continue
            ran = self.lineage(stage).get("config", {}).get(stage, {}).get("epochs")
            if isinstance(ran, int) and section.get("epochs") != ran:
                kept[stage] = {**section, "epochs": ran}
        return kept

    def _kept(self, stage: str) -> bool:
        """Finished, and built from the current output of its inputs (back to pretext)."""
        if not self.is_done(stage):
            return False
        try:
            inputs = read_json(self.lineage_path(stage)).get("inputs", {})
        except (OSError, RunDirError, AttributeError):
            return False
        return all(self._kept(dep) and inputs.get(dep) == self.output_digest(dep)
                   for dep in INPUTS[stage])

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

    # --- writing ----------------------------------------------------------------------------

    def log(self, stage: str, **record: Any) -> None:
        if not distributed.is_main():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"stage": stage, "time": round(time.time(), 3), **_finite(record)},
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
            if record.get("stage") == stage and (keep_epochs == 0 or
                                                 record.get("epoch", 0) > keep_epochs):
                dropped.append(line if line.endswith("\n") else line + "\n")
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
        self.write_text(self.log_path, "".join(kept))
        return dropped

    def save_array(self, path: Path, array: np.ndarray) -> None:
        with atomic_write(path) as handle:
            np.save(handle, array)

    def write_text(self, path: Path, text: str) -> None:
        with atomic_write(path) as handle:
            handle.write(text.encode())


def compare_configs(stage: str, old: dict[str, Any], new: dict[str, Any], done: bool,
                    folder: Path) -> list[str]:
    """Refuse keys that change ``stage``'s result; allow more epochs, with a warning."""
    before, after = _flatten(old), _flatten(new)
    epochs_key = f"{stage}.epochs"
    refused, notes = [], []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b or not _changes_result(stage, key):
            continue
        if key == "data.root" and after.get("data.dataset") in CHECKSUMMED:
            continue  # the same files, found elsewhere (a run moved to another machine)
        if key == epochs_key and isinstance(a, int) and isinstance(b, int) and b > a:
            if done:
                notes.append(f"{stage} finished with {a} epochs; {key}={b} is not applied "
                             f"(redo the stage with --force to train {b})")
            else:
                notes.append(f"{stage} continues to {b} epochs instead of {a}; a schedule "
                             f"stretched midway gives another result than {b} epochs from "
                             f"the start")
            continue
        refused.append(f"{key} ({a!r} -> {b!r})")
    if refused:
        raise ConfigError(f"--resume would keep {folder}, made with another config: "
                          f"{', '.join(refused)}; drop these changes, or redo the stage with "
                          f"--force (its old output is kept aside)")
    return notes


def _changes_result(stage: str, key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESULT_KEYS[stage])


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def exclusive(fn: Callable) -> Callable:
    """A stage function (or the pipeline) holds the locks it takes until it returns.

    ``begin_stage`` takes the lock; this releases it when the outermost such call ends, so
    ``scanclust run`` keeps the run directory across all its stages.
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        held = set(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            for key in [k for k in _HELD if k not in held]:
                _release(key)

    return wrapper


def _release(key: str) -> None:
    entry = _HELD.pop(key, None)
    if entry is None:
        return
    if not _HELD:  # the call is over: the next one lists the folders again
        _FOLDERS.clear()
    fd, created = entry
    Path(key, LOCK_NAME).unlink(missing_ok=True)  # removed while still held: see ``lock``
    os.close(fd)  # ends the record lock
    _remove_if_empty(Path(key), created)


def _remove_if_empty(root: Path, created: bool) -> None:
    """A refused first call leaves no empty run directory behind."""
    if created:
        with contextlib.suppress(OSError):
            root.rmdir()


def _read_holder(fd: int) -> str:
    for _ in range(20):  # the holder writes its PID right after taking the lock
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "(unknown PID)"


def _data_config(cfg: dict[str, Any]) -> DataConfig | None:
    """The ``data`` section as a DataConfig, or None where it names no files of its own."""
    section = cfg.get("data")
    if not isinstance(section, dict) or section.get("dataset") not in ("folder", *IMAGENET):
        return None
    return DataConfig(**section)


def _reads(stage: str, cfg: dict[str, Any], data: DataConfig) -> dict[str, Path]:
    """The folders ``stage`` reads, by lineage key (pretext reads none unless it trains)."""
    if stage == "pretext" and cfg.get("pretext", {}).get("method", "simclr") != "simclr":
        return {}
    return {k: v for split in READS[stage] for k, v in sources(data, split).items()}


def _fingerprint(data: DataConfig, key: str) -> Fingerprint:
    """The folder's fingerprint, listed once per call (see ``_FOLDERS``)."""
    if not _HELD:  # no call to span: list it now
        return fingerprint(data, key)
    folder = {**sources(data, "train"), **sources(data, "val")}[key]
    cache = (data.dataset, str(folder.resolve()), key)
    if cache not in _FOLDERS:
        _FOLDERS[cache] = fingerprint(data, key)
    return _FOLDERS[cache]


def _files(count: Any) -> str:
    return f"{count} file" + ("" if count == 1 else "s")


def _setting(key: str, data: DataConfig) -> str:
    """The folder behind a lineage key in the user's terms: ``data.root=/x`` (``(train/)``)."""
    name, _, sub = key.partition("/")
    value = data.val_root if name == "data.val_root" else data.root
    return f"{name}={value}" + (f" ({sub}/)" if sub else "")


def file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


@contextlib.contextmanager
def atomic_write(path: Path, error: type[UserError] = RunDirError,
                 note: str = "") -> Iterator[IO[bytes]]:
    """Write to a temporary file beside ``path``, then rename it over ``path``.

    Readers never see half a file, and a failed write (disk full, read-only folder) leaves the
    previous file as it was and raises ``error``: one line naming the file and the reason.
    """
    path = Path(path)
    if not distributed.is_main():  # the main process writes the same bytes
        yield io.BytesIO()
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open rather than mkstemp: the file gets the usual permissions (umask), not 0600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise error(f"cannot write {path}: {_reason(err)}{note}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, UserError):
            raise
        raise error(f"cannot write {path}: {_reason(err)}{note}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{text} (is the disk full?)"


def _finite(data: Any) -> Any:
    """NaN and infinity become null: JSON has no such numbers, and strict readers reject them."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def write_json(path: Path, data: Any) -> None:
    """Atomic, strict JSON (no NaN), so readers of metrics.json never see half or invalid files."""
    text = json.dumps(_finite(data), indent=2, allow_nan=False) + "\n"
    with atomic_write(Path(path)) as handle:
        handle.write(text.encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except ValueError:
        raise RunDirError(f"{path} is not valid JSON (edited by hand?); redo the stage that "
                          f"wrote it with --force") from None
