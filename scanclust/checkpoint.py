"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so
``torch.load(weights_only=True)`` reads it; a file from an untrusted source cannot run code.
Writing goes to a temporary file in the same folder, then ``os.replace``: a run killed while
saving leaves the previous checkpoint intact, never a truncated one. Every way a checkpoint can
fail (disk full, truncated, foreign, tensors of the wrong shape) is a one-line error naming the
file.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scanclust import distributed
from scanclust.config import TEXT_READING
from scanclust.errors import UserError
from scanclust.files import atomic_write

FORMAT_VERSION = 2


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable, or from another stage."""


def save_checkpoint(path: Path, stage: str, state: dict[str, Any]) -> None:
    """Write ``state`` atomically, with the number of processes that trained it (in a run of
    several processes ``atomic_write`` lets only the main one write: they all hold the same
    weights)."""
    payload = {"format_version": FORMAT_VERSION, "stage": stage,
               "world_size": distributed.world_size(), **state}
    # Serialised in memory first: a full disk then fails in a plain write that says so, not
    # inside torch's zip writer ("unexpected pos ...").
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_write(Path(path), CheckpointError, "; the previous checkpoint is kept") as handle:
        handle.write(buffer.getbuffer())


def load_checkpoint(path: Path, stage: str | None = None, mmap: bool = False) -> dict[str, Any]:
    """Load on the CPU; ``stage`` guards against feeding e.g. a pretext file to self-label."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    redo = "; redo its stage with --force"
    payload = read_tensors(path, f"checkpoint {path}", redo, mmap=mmap)
    if not isinstance(payload, dict) or "stage" not in payload:
        raise CheckpointError(f"{path} is not a scanclust checkpoint")
    if stage is not None and payload["stage"] != stage:
        raise CheckpointError(f"{path} holds the {payload['stage']!r} stage, expected {stage!r}")
    return _upgrade(payload)


def read_tensors(path: Path, what: str, hint: str = "", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, every failure one line naming
    ``what``. A file that holds other objects than tensors and plain data is refused as such:
    torch's own message suggests ``weights_only=False``, which would run what the file holds."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():
            raise CheckpointError(f"{what} holds objects other than tensors and plain data; it "
                                  f"is not loaded, since unpickling it could run code") from None
        raise CheckpointError(f"{what} is truncated or corrupt{hint}") from None
    except Exception:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"{what} is truncated or corrupt{hint}") from None


def _upgrade(payload: dict[str, Any]) -> dict[str, Any]:
    """Bring an older checkpoint's recorded config up to the current format.

    Version 1 had no keys for the variants of config.TEXT_READING and ran with those values,
    and its ``resnet18_stl`` was torchvision's 7x7/2 stem, now called ``resnet18``.
    """
    config = payload.get("config")
    if payload.get("format_version", 1) >= 2 or not isinstance(config, dict):
        return payload
    for dotted, value in TEXT_READING.items():
        section, key = dotted.rsplit(".", 1)
        node = config
        for part in section.split("."):
            node = node.setdefault(part, {})
        node.setdefault(key, value)
    model = config.get("model", {})
    if model.get("backbone") == "resnet18_stl":
        model["backbone"] = "resnet18"
    return payload


def checkpoint_epoch(path: Path) -> int:
    """The epoch a checkpoint was saved after, read without loading its tensors."""
    return int(load_checkpoint(path, mmap=True).get("epoch", 0))


def load_state(module: nn.Module, state: Any, source: str | Path, hint: str = "") -> None:
    """``module.load_state_dict(state)``, with a one-line error naming ``source`` and the first
    tensor that is missing, unexpected or of the wrong shape (torch prints pages of them)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds no state dict for a {type(module).__name__}")
    wanted = module.state_dict()
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in wanted]
    problem = ""
    if missing:
        problem = f"lacks {len(missing)} tensors of the {type(module).__name__} (first: {missing[0]})"
    elif unexpected:
        problem = f"has {len(unexpected)} tensors the {type(module).__name__} lacks " \
                  f"(first: {unexpected[0]})"
    else:
        for key, target in wanted.items():
            value = state[key]
            if not isinstance(value, torch.Tensor) or value.shape != target.shape:
                shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                problem = f"has {key} of shape {shape} where the model needs {list(target.shape)}"
                break
    if problem:
        raise CheckpointError(f"{source} {problem}{hint}")
    module.load_state_dict(state)
