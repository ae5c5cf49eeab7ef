"""Device choice: an absent device is a config error naming it, before any work."""

from __future__ import annotations

import pytest
import torch

from scanclust.config import ConfigError
from scanclust.runtime import resolve_device


def test_cuda_index_beyond_the_machines_devices_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"'device': cuda:2 but this machine has 2 CUDA "
                                          r"device\(s\), cuda:0 .. cuda:1"):
        resolve_device("cuda:2")


def test_cuda_without_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'device': cuda but no CUDA device is available"):
        resolve_device("cuda")
