"""What each stage of a run was built from, and whether it still holds: lineage.

A stage records, when it starts, a content hash of each input stage's output and a fingerprint
of the image files it reads (``data/fingerprint.py``), and, when it finishes, the hashes of its
own output files (``<stage>/lineage.json``). A stage whose input changed since (a redone
pretext, a checkpoint copied in from another run, images replaced, added or removed) is
refused, and so is every stage built on it, naming the earliest stage to redo with
``--force``. A lineage written before fingerprints existed has none: its images are not
compared. ``plan`` decides how a stage proceeds (fresh, resume or done) from all this and from
the config it was made with (``compare_configs``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from scanclust import lock
from scanclust.config import ADDED_KEYS, ConfigError, DataConfig
from scanclust.data.fingerprint import IMAGENET, Fingerprint, difference, fingerprint, sources
from scanclust.files import RunDirError, file_digest, read_json

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
LINEAGE_NAME = "lineage.json"

# Fingerprints of the image folders, by (data set, folder, key): listed once while this process
# holds a run directory's lock, so every stage of one call compares against the same listing.
_FOLDERS: dict[tuple[str, str, str], Fingerprint] = {}
lock.ON_LAST_RELEASE.append(_FOLDERS.clear)  # the next call lists the folders again


class Lineage:
    """The lineage checks of ``rundir.RunDir`` (which supplies the paths)."""

    root: Path
    _verified: set[str]

    def output_digest(self, stage: str) -> str:
        """sha256 over the stage's output files: what a later stage was built from."""
        text = "".join(f"{name}:{digest}\n" for name, digest in self.output_files(stage).items())
        return hashlib.sha256(text.encode()).hexdigest()

    def output_files(self, stage: str) -> dict[str, str]:
        """sha256 of each output file the stage folder holds."""
        folder = self.stage_dir(stage)
        return {name: file_digest(folder / name) for name in OUTPUTS[stage]
                if (folder / name).is_file()}

    def lineage(self, stage: str) -> dict[str, Any]:
        try:
            return read_json(self.lineage_path(stage))
        except (OSError, RunDirError):
            raise RunDirError(
                f"{self.stage_dir(stage)} has no readable {LINEAGE_NAME}, so what it was built "
                f"from is unknown (made by an older scanclust?); redo it with "
                f"{self._redo(stage)}") from None

    def _redo(self, stage: str) -> str:
        later = ", then the stages after it" if stage not in ("selflabel", "evaluate") else ""
        return (f"`scanclust {stage} --out {self.root} --force` (its old output is kept "
                f"aside){later}")

    def _check_inputs(self, stage: str, recorded: dict[str, Any],
                      will_run: frozenset[str] | set[str] = frozenset()) -> None:
        """Refuse a stage built from other output of its inputs than they hold now."""
        for dep in INPUTS[stage]:
            if dep in will_run:
                why = f"this call redoes or continues {dep}"
            elif recorded.get("inputs", {}).get(dep) != self.output_digest(dep):
                why = f"{dep} was redone or replaced since"
            else:
                continue
            raise RunDirError(f"{self.stage_dir(stage)} was built from another {dep} output than "
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
        self._check_inputs(stage, recorded)
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
        """The fingerprints of the folders ``stage`` reads ({} for data sets without files)."""
        data = _data_config(cfg)
        return {} if data is None else {key: _fingerprint(data, key)
                                        for key in _reads(stage, cfg, data)}

    def _upstream(self, inputs: tuple[str, ...], will_run: frozenset[str] | set[str]) -> set[str]:
        """The finished stages ``inputs`` were built from, directly or not, that this call keeps."""
        found = {dep for dep in inputs if dep in STAGE_DIRS}
        for dep in list(found):
            found |= self._upstream(INPUTS[dep], frozenset())
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
        self._check_inputs(stage, recorded, will_run)
        if state == "done":
            self.verify(stage)
        notes = compare_configs(stage, recorded.get("config", {}), cfg, state == "done",
                                self.stage_dir(stage))
        return ("done" if state == "done" else "resume"), notes

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


def compare_configs(stage: str, old: dict[str, Any], new: dict[str, Any], done: bool,
                    folder: Path) -> list[str]:
    """Refuse keys that change ``stage``'s result; allow more epochs, with a warning."""
    before, after = _flatten(old), _flatten(new)
    refused, notes = [], []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, ADDED_KEYS.get(key)), after.get(key)
        if a == b or not _changes_result(stage, key):
            continue
        if key == "data.root" and after.get("data.dataset") in CHECKSUMMED:
            continue  # the same files, found elsewhere (a run moved to another machine)
        if key == f"{stage}.epochs" and isinstance(a, int) and isinstance(b, int) and b > a:
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
    if not lock.held():  # no call to span: list it now
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

