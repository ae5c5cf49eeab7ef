"""A folder run's reviewed labels: ``RUN/labels.json``, written by ``scanclust review``.

The file is an ordered list of edits to the model's clusters, replayed from the start to give
the labels, so undo (dropping the last edit) is exact and the file says how every label came
about. Format version 1::

    {"format": "scanclust-labels", "version": 1,
     "model": {"stage": "selflabel", "output": "<sha256 of its checkpoint>"},
     "edits": [{"op": "rename", "cluster": 2, "name": "sevens"},   # "" gives the default back
               {"op": "merge", "cluster": 1, "into": 0},            # 1's images join 0
               {"op": "move", "images": ["d7/7_03.png"], "to": 3},  # 3 = K: a new cluster
               {"op": "exclude", "images": ["broken.png"]},         # left out of exports
               {"op": "include", "images": ["broken.png"]}],
     "clusters": [{"cluster": 0, "name": "zeros", "named": true, "size": 40, "excluded": 1}],
     "merged": {"1": 0},
     "labels": {"d0/0_00.png": "zeros", "broken.png": null}}

- ``images`` are ``assignments.csv`` paths (escaped, ``images.escape_name``); ``cluster`` and
  ``into`` name live clusters: the model's 0..K-1 and the new ones, less those merged away.
  ``to`` may also be the next new id, which makes a new cluster (K, then K + 1, ...).
- Names: at most 100 characters, no control characters, unique among the live clusters
  (ignoring case); a cluster without one is ``cluster_03`` (two digits at least).
- A merged cluster's target keeps its name, or takes the merged one's if it has none.
- ``model`` is the hash of the model whose clusters the edits refer to: after that stage is
  redone, the file is refused instead of naming other clusters.
- ``clusters``, ``merged`` and ``labels`` (per image its label, ``null`` when excluded) are the
  result, rewritten with every edit for readers; scanclust reads only ``edits`` and ``model``.

A file that is not valid, or names a cluster or image that does not exist, is refused with the
edit it stopped at, and never overwritten.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scanclust.data.images import unescape_name
from scanclust.errors import UserError
from scanclust.files import read_json, write_csv, write_json
from scanclust.rundir import RunDir

log = logging.getLogger("scanclust")

FORMAT, VERSION, FILE_NAME = "scanclust-labels", 1, "labels.json"
MAX_NAME = 100
KEYS = {"rename": {"cluster", "name"}, "merge": {"cluster", "into"}, "move": {"images", "to"},
        "exclude": {"images"}, "include": {"images"}}
KEEP = "fix it or move it aside (scanclust leaves it as it is)"


class LabelsError(UserError, ValueError):
    """A run without clusters to label, a labels.json that does not fit it, or a bad edit."""


@dataclass
class Assignments:
    """What ``scanclust report`` wrote for a folder run: one row per image."""

    run: Path
    folder: Path  # the image folder, its real name
    stage: str
    num_clusters: int
    header: list[str]  # assignments.csv's columns, less a label column
    rows: list[list[str]]
    paths: list[str]  # escaped, as in the CSV
    clusters: list[int]
    confidence: list[float]
    summary: dict[str, Any]  # clusters.json


def read_assignments(run: str | Path) -> Assignments:
    run = Path(run)
    if not run.is_dir():
        raise LabelsError(f"RUN {run} {'is not a folder' if run.exists() else 'does not exist'}")
    if not (run / "config.yaml").is_file():
        raise LabelsError(f"RUN {run} is not a scanclust run directory (no config.yaml)")
    if not RunDir(run).is_done("scan"):
        raise LabelsError(f"{run} has no finished scan stage, so no clusters yet; finish it "
                          f"with `scanclust cluster FOLDER --out {run} --resume`")
    csv_path, json_path = run / "assignments.csv", run / "clusters.json"
    for path in (csv_path, json_path):
        if not path.is_file():
            raise LabelsError(f"{run} has no {path.name}; write it with `scanclust report --out "
                              f"{run}` (or run `scanclust cluster FOLDER --out {run}`)")
    redo = f"rewrite it with `scanclust report --out {run}`"
    summary = read_json(json_path)
    try:
        k, stage = int(summary["num_clusters"]), str(summary["stage"])
        folder = Path(unescape_name(summary["folder"]))
        table = list(csv.reader(io.StringIO(csv_path.read_text(encoding="utf-8"), newline="")))
    except (KeyError, TypeError, ValueError):
        raise LabelsError(f"{json_path} or {csv_path.name} is not as scanclust report writes "
                          f"it; {redo}") from None
    header = table[0] if table else []
    if header[:3] != ["path", "cluster", "confidence"]:
        raise LabelsError(f"{csv_path} does not start with the columns path, cluster, "
                          f"confidence; {redo}")
    keep = [i for i, name in enumerate(header) if name != "label"]
    rows = [[row[i] for i in keep if i < len(row)] for row in table[1:]]
    for n, row in enumerate(rows, 2):
        try:
            parts = unescape_name(row[0]).split("/")
            float(row[2])
            good = len(row) == len(keep) and row[1].isdigit() and int(row[1]) < k
        except (IndexError, ValueError):
            good = False
        if not good or Path(parts[0]).is_absolute() or ".." in parts:
            raise LabelsError(f"{csv_path}, line {n}: not a path inside the folder with a "
                              f"cluster 0..{k - 1} and a confidence; {redo}")
    paths = [row[0] for row in rows]
    if len(set(paths)) != len(paths):
        raise LabelsError(f"{csv_path} lists an image twice; {redo}")
    return Assignments(run, folder, stage, k, [header[i] for i in keep], rows, paths,
                       [int(row[1]) for row in rows], [float(row[2]) for row in rows], summary)


def model_digest(a: Assignments) -> dict[str, Any] | None:
    """The stage and output hash of the model behind the assignments (None if unrecorded)."""
    try:
        output = json.loads((RunDir(a.run).lineage_path(a.stage)).read_text())["output"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"stage": a.stage, "output": output}


class Labels:
    """The state the edits lead to. ``apply`` checks an edit before it changes anything."""

    def __init__(self, assignments: Assignments, model: dict[str, Any] | None) -> None:
        self.assignments, self.model = assignments, model
        self.edits: list[dict[str, Any]] = []
        self.cluster = list(assignments.clusters)  # per row, after the edits
        self.excluded: set[int] = set()
        self.names: dict[int, str] = {}
        self.live = set(range(assignments.num_clusters))
        self.merged: dict[int, int] = {}
        self.next_id = assignments.num_clusters
        self.row = {path: i for i, path in enumerate(assignments.paths)}

    def apply(self, edit: Any) -> None:
        op = edit.get("op") if isinstance(edit, dict) else None
        if op not in KEYS:
            raise LabelsError(f"an edit is an object whose op is one of {', '.join(KEYS)}")
        if set(edit) != KEYS[op] | {"op"}:
            raise LabelsError(f"a {op} edit has the keys op, {', '.join(sorted(KEYS[op]))}")
        if op == "rename":
            cluster, name = self._cluster(edit["cluster"]), self._name(edit["name"])
            for other in self.live - {cluster}:
                if name and self.name(other).casefold() == name.casefold():
                    raise LabelsError(f"cluster {other} is already named {self.name(other)}; "
                                      f"merge the two clusters instead")
            edit = {**edit, "name": name}
            if name:
                self.names[cluster] = name
            else:
                self.names.pop(cluster, None)
        elif op == "merge":
            source, target = self._cluster(edit["cluster"]), self._cluster(edit["into"])
            if source == target:
                raise LabelsError(f"cannot merge cluster {source} into itself")
            self.cluster = [target if c == source else c for c in self.cluster]
            if source in self.names and target not in self.names:
                self.names[target] = self.names[source]
            self.names.pop(source, None)
            self.live.discard(source)
            self.merged[source] = target
        else:
            rows = self._rows(edit["images"])
            if op == "move":
                if type(edit["to"]) is int and edit["to"] == self.next_id:  # a new cluster
                    self.live.add(self.next_id)
                    self.next_id += 1
                to = self._cluster(edit["to"])
                for r in rows:
                    self.cluster[r] = to
            elif op == "exclude":
                self.excluded.update(rows)
            else:
                self.excluded.difference_update(rows)
        self.edits.append(edit)

    def _cluster(self, value: Any) -> int:
        if type(value) is not int or value not in self.live:
            merged = type(value) is int and value in self.merged
            gone = f" (merged into cluster {self.resolve(value)})" if merged else ""
            raise LabelsError(f"cluster {value!r} does not exist{gone}")
        return value

    def _rows(self, images: Any) -> list[int]:
        if not isinstance(images, list) or not images or \
                not all(isinstance(p, str) for p in images):
            raise LabelsError("images must be a non-empty list of paths")
        for path in images:
            if path not in self.row:
                raise LabelsError(f"image {path!r} is not in assignments.csv")
        return [self.row[p] for p in images]

    @staticmethod
    def _name(value: Any) -> str:
        if not isinstance(value, str):
            raise LabelsError("a name is a string")
        name = value.strip()
        if len(name) > MAX_NAME:
            raise LabelsError(f"a name has at most {MAX_NAME} characters")
        if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in name):
            raise LabelsError("a name cannot hold tabs, line breaks or other control characters")
        return name

    def name(self, cluster: int) -> str:
        width = max(2, len(str(self.assignments.num_clusters - 1)))
        return self.names.get(cluster) or f"cluster_{cluster:0{width}d}"

    def resolve(self, cluster: int) -> int:
        """The live cluster a model cluster's images went to by merges."""
        while cluster in self.merged:
            cluster = self.merged[cluster]
        return cluster

    def label(self, row: int) -> str | None:
        return None if row in self.excluded else self.name(self.cluster[row])

    def model_names(self) -> dict[int, str]:
        """Each model cluster's name: its own, or that of the cluster it was merged into."""
        return {c: self.name(self.resolve(c)) for c in range(self.assignments.num_clusters)}

    def clusters(self) -> list[dict[str, Any]]:
        sizes = Counter(self.cluster)
        excluded = Counter(self.cluster[r] for r in self.excluded)
        return [{"cluster": c, "name": self.name(c), "named": c in self.names,
                 "size": sizes[c], "excluded": excluded[c]} for c in sorted(self.live)]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model": self.model, "edits": self.edits,
                "clusters": self.clusters(),
                "merged": {str(c): self.resolve(c) for c in sorted(self.merged)},
                "labels": {p: self.label(i) for i, p in enumerate(self.assignments.paths)}}

    def replayed(self, edits: list[dict[str, Any]]) -> Labels:
        labels = Labels(self.assignments, self.model)
        for edit in edits:
            labels.apply(edit)
        return labels


def load_labels(a: Assignments) -> Labels:
    """The run's labels: the edits of labels.json replayed, or none without the file."""
    path = a.run / FILE_NAME
    labels = Labels(a, model_digest(a))
    if not path.exists():
        return labels
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise LabelsError(f"{path} is not valid JSON ({err}); {KEEP}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or \
            not isinstance(data.get("edits"), list):
        raise LabelsError(f"{path} is not a scanclust labels file (format {FORMAT!r} with a "
                          f"list of edits); {KEEP}")
    if data.get("version") != VERSION:
        raise LabelsError(f"{path} has format version {data.get('version')!r}; this scanclust "
                          f"reads version {VERSION}; {KEEP}")
    if data.get("model") and labels.model and data["model"] != labels.model:
        raise LabelsError(f"{path} names the clusters of another model: the run's model "
                          f"({labels.model['stage']}) was redone or finished since; move it "
                          f"aside to review the new clusters")
    for n, edit in enumerate(data["edits"], 1):
        try:
            labels.apply(edit)
        except LabelsError as err:
            raise LabelsError(f"{path}, edit {n}: {err}; {KEEP}") from None
    return labels


def write_outputs(labels: Labels) -> None:
    """The label column of assignments.csv and the names in clusters.json, from the labels.
    Written after labels.json (the record): a kill between the two leaves stale names here,
    which the next review or report rewrites."""
    a = labels.assignments
    write_csv(a.run / "assignments.csv", [a.header + ["label"]] + [
        row + [labels.label(i) or ""] for i, row in enumerate(a.rows)])
    names = labels.model_names()
    for entry in a.summary["clusters"]:
        c = entry["cluster"]
        entry.update(name=names.get(c), merged_into=labels.resolve(c) if c in labels.merged else None)
    write_json(a.run / "clusters.json", a.summary)


def cluster_names(run: str | Path) -> dict[int, str]:
    """Each model cluster's reviewed name; {} for a run without labels.json."""
    if not (Path(run) / FILE_NAME).exists():
        return {}
    return load_labels(read_assignments(run)).model_names()


def report_names(run: str | Path) -> dict[int, str]:
    """For ``scanclust report``, after it rewrote assignments.csv and clusters.json: the names
    of labels.json put back into them. A labels.json that no longer fits the run is left
    alone with a warning, and the report is written without names."""
    if not (Path(run) / FILE_NAME).exists():
        return {}
    try:
        labels = load_labels(read_assignments(run))
    except LabelsError as err:
        log.warning("report: the reviewed names are not shown: %s", err)
        return {}
    write_outputs(labels)
    return labels.model_names()

