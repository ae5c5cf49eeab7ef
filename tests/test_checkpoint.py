"""Checkpoints: round trip, safe loading, atomic writes, clear errors; RNG capture/restore."""

from __future__ import annotations

import errno
import io
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import scanclust.checkpoint as checkpoint
from scanclust.checkpoint import CheckpointError, load_checkpoint, load_state, save_checkpoint
from scanclust.models import build_backbone
from scanclust.models.saved import load_backbone_weights
from scanclust.runtime import capture_rng, restore_rng


class _Custom:
    def __init__(self) -> None:
        self.value = 3


def _state() -> dict:
    torch.manual_seed(0)
    return {"model": {"w": torch.randn(2, 3), "b": torch.arange(3)},
            "epoch": 4, "best_loss": 0.25, "name": "scan",
            "history": [1.0, 2.5], "nested": {"a": {"b": [1, "x"]}}, "rng": capture_rng()}


def test_round_trip(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "sub" / "checkpoint.pt"
    save_checkpoint(path, "scan", state)
    loaded = load_checkpoint(path, "scan")
    assert loaded["stage"] == "scan"
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert torch.equal(loaded["model"]["b"], state["model"]["b"])
    assert (loaded["epoch"], loaded["best_loss"], loaded["name"]) == (4, 0.25, "scan")
    assert loaded["history"] == [1.0, 2.5]
    assert loaded["nested"] == {"a": {"b": [1, "x"]}}
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert loaded["rng"]["python"] == state["rng"]["python"]


def test_load_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"stage": "scan", "obj": _Custom()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, "scan", {"epoch": 1})

    def broken_save(obj, handle) -> None:
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt  # a run killed while saving

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, "scan", {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path, "scan")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_wrong_stage_names_both(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, "pretext", {})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, "selflabel")
    assert "pretext" in str(err.value) and "selflabel" in str(err.value)


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nothing.pt"
    with pytest.raises(CheckpointError, match="nothing.pt"):
        load_checkpoint(path)


def test_truncated_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, "scan", {"w": torch.randn(100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path, "scan")


def test_non_scanclust_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="plain.pt"):
        load_checkpoint(path)


def _draw() -> tuple[list[float], list[float], list[float]]:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(),
            [random.random() for _ in range(3)])


def test_restore_rng_reproduces_draws(tmp_path: Path) -> None:
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    _draw()
    state = capture_rng()
    first = _draw()
    _draw()
    # through a checkpoint file, as a resumed run does
    save_checkpoint(tmp_path / "c.pt", "scan", {"rng": state})
    restore_rng(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert _draw() == first


def test_restore_rng_reproduces_python_gauss() -> None:
    random.seed(1)
    random.gauss(0, 1)  # leaves the second Box-Muller value cached
    state = capture_rng()
    first = random.gauss(0, 1)
    restore_rng(state)
    assert random.gauss(0, 1) == first


# --- one-line errors for every way a checkpoint fails -----------------------------------------

def test_truncated_file_says_truncated_or_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, "scan", {"w": torch.randn(100)})
    data = path.read_bytes()
    for cut in (len(data) // 2, 10, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path, "scan")
        assert str(err.value).startswith(f"checkpoint {path} is truncated or corrupt;")


def test_refused_pickle_does_not_suggest_running_it(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"stage": "scan", "obj": _Custom()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "could run code" in str(err.value)
    assert "weights_only=False" not in str(err.value) and "\n" not in str(err.value)


def test_pickled_foreign_weights_get_the_same_plain_refusal(tmp_path: Path) -> None:
    # pretext.weights and `cluster --backbone FILE` read foreign files through the same door
    path = tmp_path / "moco.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "obj": _Custom()}, path)
    with pytest.raises(CheckpointError) as err:
        load_backbone_weights(build_backbone("resnet_tiny", 4), path)
    assert str(err.value) == (f"pretext.weights={path} holds objects other than tensors and "
                              f"plain data; it is not loaded, since unpickling it could run code")
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"moco.pth is truncated or corrupt; is it a "
                                              r"PyTorch weights file"):
        load_backbone_weights(build_backbone("resnet_tiny", 4), path)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, "scan", {"epoch": 1})
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _Full(fd))
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(path, "scan", {"epoch": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    assert str(err.value) == (f"cannot write {path}: No space left on device; the previous "
                              f"checkpoint is kept")
    assert load_checkpoint(path, "scan")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


class _Full(io.FileIO):
    """A file on a full disk: opening works, writing does not (ENOSPC)."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd, "wb")

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_wrong_shape_tensor_names_file_key_and_shapes(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    state = {"0.weight": torch.zeros(4, 5), "0.bias": torch.zeros(4)}
    with pytest.raises(CheckpointError, match=r"c.pt has 0.weight of shape \[4, 5\] where the "
                                              r"model needs \[4, 3\]"):
        load_state(model, state, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors of the Sequential \(first: 0.bias"):
        load_state(model, {"0.weight": torch.zeros(4, 3)}, "c.pt")
    with pytest.raises(CheckpointError, match=r"has 1 tensors the Sequential lacks"):
        load_state(model, {**model.state_dict(), "extra": torch.zeros(1)}, "c.pt")


def test_torchvision_resnet18_weights_into_the_cifar_variant(tmp_path: Path) -> None:
    """The CIFAR stem is a 3x3 conv; ImageNet ResNet-18 weights have a 7x7 one."""
    from torchvision.models import resnet18

    from scanclust.models import build_backbone
    from scanclust.models.saved import load_backbone_weights

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_backbone_weights(build_backbone("resnet18_cifar"), path)
    assert str(err.value) == (f"pretext.weights={path} has conv1.weight of shape [64, 3, 7, 7] "
                              f"where the model needs [64, 3, 3, 3]; are they weights for another "
                              f"backbone than model.backbone?")
    load_backbone_weights(build_backbone("resnet18"), path)  # the right backbone loads
