"""``scanclust export RUN DEST``: the reviewed clusters as a labelled data set.

Labels are the names of ``RUN/labels.json`` after its edits (``labels.py``), excluded images
left out; without a review, the model's clusters named ``cluster_00``, ``cluster_01``, ...

- ``folders`` (default): ``DEST/<label>/<path relative to the image folder>``, subfolders kept;
- ``imagefolder``: ``DEST/<label>/<relative path with / as __>``, flat; a file whose extension
  torchvision's ImageFolder does not read (.gif, .jfif, .avif, ...) is written as PNG
  (``<name>.png``, decoded as the run read it), so ``ImageFolder(DEST)`` finds every image;
- ``csv``: DEST is one file, ``path,label``: the absolute path, escaped as every name
  scanclust writes (``images.unescape_name`` gives the real one), and the label as named.

``--link symlink`` (the default) links to the originals, ``copy`` copies them. A label becomes
a folder name with ``/ \\ : * ? " < > |`` as ``_``, no leading dot, ``unnamed`` if empty, and
``-2``, ``-3`` ... where two would be the same ignoring case. The folder is built beside DEST
under a hidden name and renamed into place at the end, so a DEST that exists is complete.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterable

from scanclust.data.images import ImageReadError, escape_name, open_image, unescape_name
from scanclust.errors import UserError
from scanclust.labels import load_labels, read_assignments
from scanclust.files import write_csv

FORMATS, LINKS = ("folders", "imagefolder", "csv"), ("symlink", "copy")
# torchvision.datasets.folder.IMG_EXTENSIONS, without importing torchvision for it
IMAGEFOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                          ".webp")


class ExportError(UserError, ValueError):
    """An export that cannot be made as asked; nothing was written."""


def folder_names(labels: Iterable[str]) -> dict[str, str]:
    """Each label's folder: safe on any file system, never hidden, unique ignoring case."""
    safe = {}
    for label in labels:
        base = re.sub(r'[/\\:*?"<>|\x00-\x1f]', "_", label).strip() or "unnamed"
        safe[label] = "_" + base[1:] if base.startswith(".") else base  # "..", ".hidden"
    used: set[str] = set()
    # a label that is a safe name already comes first and keeps it
    return {label: _unique(used, safe[label])
            for label in sorted(safe, key=lambda label: (safe[label] != label, label))}


def export(run: str | Path, dest: str | Path, fmt: str = "folders",
           link: str | None = None) -> dict[str, Any]:
    """Write the data set; returns counts for the summary line."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if link not in (None, *LINKS):
        raise ExportError(f"--link {link!r} is not one of {', '.join(LINKS)}")
    if fmt == "csv" and link:
        raise ExportError("--link applies to the folders and imagefolder formats, not csv")
    labels = load_labels(read_assignments(run))
    a, dest = labels.assignments, Path(dest)
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise ExportError(f"DEST {dest} exists{' and is not empty' if dest.is_dir() else ''}; "
                          f"choose a new path or remove it")
    if dest.resolve().is_relative_to(a.folder.resolve()):
        raise ExportError(f"DEST {dest} is inside the image folder {escape_name(a.folder)}; a "
                          f"later `scanclust cluster` would read the exported images")
    rows = [i for i in range(len(a.paths)) if labels.label(i) is not None]
    if not rows:
        raise ExportError(f"nothing to export: all {len(a.paths)} images of {run} are excluded")
    sources = {i: a.folder / unescape_name(a.paths[i]) for i in rows}
    for i, source in sources.items():
        if not source.is_file():
            raise ExportError(f"image {a.paths[i]} of assignments.csv is no longer in "
                              f"{escape_name(a.folder)}; rewrite the run's files with "
                              f"`scanclust report --out {run}`")
    summary = {"images": len(rows), "labels": len({labels.label(i) for i in rows}),
               "excluded": len(a.paths) - len(rows), "converted": 0, "skipped_by_imagefolder": 0}
    dest.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        write_csv(dest, [["path", "label"]] + [
            [escape_name(sources[i].absolute()), labels.label(i)] for i in rows], ExportError)
        return summary
    folders = folder_names({labels.label(i) for i in rows})
    building = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
    try:
        used: set[str] = set()
        for i in rows:
            name = unescape_name(a.paths[i])
            if fmt == "imagefolder":
                name = _unique(used, *os.path.splitext(name.replace("/", "__")))
            target = building / folders[labels.label(i)] / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.name.lower().endswith(IMAGEFOLDER_EXTENSIONS):
                if fmt == "folders":
                    summary["skipped_by_imagefolder"] += 1
                else:  # a copy ImageFolder reads, with the pixels the run saw
                    _convert(sources[i], target.with_name(target.name + ".png"))
                    summary["converted"] += 1
                    continue
            if link == "copy":
                shutil.copy2(sources[i], target)
            else:
                os.symlink(sources[i].resolve(), target)
        os.replace(building, dest)
    except BaseException as err:
        shutil.rmtree(building, ignore_errors=True)
        if isinstance(err, OSError):  # disk full, permissions: say so in one line
            raise ExportError(f"cannot export to {dest}: {err.strerror or err}; nothing was "
                              f"written there") from None
        raise
    return summary


def _convert(source: Path, target: Path) -> None:
    try:
        open_image(source).save(target)
    except ImageReadError as err:
        raise ExportError(f"cannot read image {escape_name(source)}: {err}") from None


def _unique(used: set[str], stem: str, suffix: str = "") -> str:
    """``<stem><suffix>``, or ``<stem>-2<suffix>``, ... when taken (ignoring case: a flat
    folder on a case-insensitive disk)."""
    name, k = stem + suffix, 2
    while name.casefold() in used:
        name, k = f"{stem}-{k}{suffix}", k + 1
    used.add(name.casefold())
    return name
