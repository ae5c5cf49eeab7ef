"""The frozen backbone's eval features, computed once per folder run: same numbers, one pass."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import scanclust.engine as engine
from scanclust import frozen_features
from tests.conftest import CLUSTER_TINY, write_digit_folder


def test_kept_only_for_the_same_weights_inputs_and_count() -> None:
    net, first = nn.Linear(3, 2), torch.ones(4, 3)
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.full((5, 2), float(len(calls)))

    assert frozen_features.features(net, first, 5, compute)[0, 0] == 1  # outside: not kept
    with frozen_features.remembering():
        assert frozen_features.features(net, first, 5, compute)[0, 0] == 2
        assert frozen_features.features(net, first.clone(), 5, compute)[0, 0] == 2  # kept
        assert frozen_features.features(net, first + 1, 5, compute)[0, 0] == 3  # other inputs
        assert frozen_features.features(net, first + 1, 6, compute)[0, 0] == 4  # other count
        with torch.no_grad():
            net.weight[0, 0] += 1e-6  # any change of a weight
        assert frozen_features.features(net, first + 1, 6, compute)[0, 0] == 5
    assert not frozen_features.active()


def _assignments(out: Path) -> list[str]:
    return (out / "assignments.csv").read_text(encoding="utf-8").splitlines()


def test_a_cpu_preset_run_encodes_the_eval_view_once_and_gives_the_same_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scanclust.folder import cluster

    write_digit_folder(tmp_path / "f", per_class=8, nested=False)
    passes = []
    real = engine.infer

    def counted(*args, **kwargs):
        passes.append(args[8] if len(args) > 8 else kwargs.get("kind", "eval"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "infer", counted)
    cluster(tmp_path / "f", tmp_path / "once", clusters=3, preset="cpu", overrides=CLUSTER_TINY)
    once = passes.count("eval")
    passes.clear()
    monkeypatch.setattr(frozen_features, "remembering", contextlib.nullcontext)
    cluster(tmp_path / "f", tmp_path / "each", clusters=3, preset="cpu", overrides=CLUSTER_TINY)
    assert once == 1 and passes.count("eval") >= 4  # SCAN's cache and val, self-label, ...
    assert _assignments(tmp_path / "once") == _assignments(tmp_path / "each")
    for name in ("features_train.npy", "train.npy"):
        assert np.array_equal(np.load(tmp_path / "once" / "neighbors" / name),
                              np.load(tmp_path / "each" / "neighbors" / name))
