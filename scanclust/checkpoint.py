"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so
``torch.load(weights_only=True)`` reads it; a file from an untrusted source cannot run code.
Writing goes to a temporary file in the same folder, then ``os.replace``: a run killed while
saving leaves the previous checkpoint intact, never a truncated one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from scanclust import distributed
from scanclust.errors import UserError

FORMAT_VERSION = 2

# What version-1 checkpoints (written before the authors' released behaviour became the
# default) ran with, for the config keys that did not exist then. Filling them in on load lets
# an older run directory rebuild its model and say which variant it used.
_VERSION_1_BEHAVIOUR = {
    "augment.strong.op_draw": "distinct", "augment.strong.posterize_bits": [4, 8],
    "augment.strong.interpolation": "bilinear", "augment.strong.fill": 128,
    "augment.strong.shear_pivot": "center", "augment.strong.cutout_side": "fixed",
    "scan.partner": "neighbors", "scan.selection_entropy_weight": None,
    "scan.selection_neighbors": None, "scan.selection_self": False,
}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable, or from another stage."""


def save_checkpoint(path: Path, stage: str, state: dict[str, Any]) -> None:
    """Write ``state`` with the number of processes that trained it; in a run of several
    processes only the main one writes (they all hold the same weights)."""
    if not distributed.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, "stage": stage,
               "world_size": distributed.world_size(), **state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, stage: str | None = None) -> dict[str, Any]:
    """Load on the CPU; ``stage`` guards against feeding e.g. a pretext file to self-label."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which one
        raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(payload, dict) or "stage" not in payload:
        raise CheckpointError(f"{path} is not a scanclust checkpoint")
    if stage is not None and payload["stage"] != stage:
        raise CheckpointError(f"{path} holds the {payload['stage']!r} stage, expected {stage!r}")
    return _upgrade(payload)


def _upgrade(payload: dict[str, Any]) -> dict[str, Any]:
    """Bring an older checkpoint's recorded config up to the current format.

    Version 1 had no keys for the variants in _VERSION_1_BEHAVIOUR, and its ``resnet18_stl``
    was torchvision's 7x7/2 stem, now called ``resnet18``.
    """
    config = payload.get("config")
    if payload.get("format_version", 1) >= 2 or not isinstance(config, dict):
        return payload
    for dotted, value in _VERSION_1_BEHAVIOUR.items():
        section, key = dotted.rsplit(".", 1)
        node = config
        for part in section.split("."):
            node = node.setdefault(part, {})
        node.setdefault(key, value)
    model = config.get("model", {})
    if model.get("backbone") == "resnet18_stl":
        model["backbone"] = "resnet18"
    return payload
