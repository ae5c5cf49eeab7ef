"""Library backbones: torchvision and timm names, their weights from the libraries' caches, and
the one-line error that says where to put a weights file when there is no network."""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
import torchvision.models._api as tv_api

from scanclust.config import ConfigError, load_config
from scanclust.models import build_backbone
from scanclust.models.pretrained import (PretrainedError, input_settings, library_backbone,
                                         load_pretrained, pretrained_state, weights_file)


def test_torchvision_names_become_backbones() -> None:
    net = library_backbone("mobilenet_v3_small")  # classifier = [Linear, Hardswish, Dropout, Linear]
    assert net.out_dim == 1024
    net.eval()
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 1024)
    vit = build_backbone("regnet_y_400mf")  # through build_backbone, as the stages call it
    assert vit.out_dim == 440 and vit.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 440)
    with pytest.raises(PretrainedError, match="did you mean resnet50"):
        library_backbone("resnet5O")


def test_weights_come_from_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    reference = torchvision.models.resnet18(weights=None).state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference, cache / os.path.basename(weights.url))  # as a download leaves it
    backbone = build_backbone("resnet18")
    load_pretrained(backbone, "resnet18")
    assert torch.equal(backbone.state_dict()["layer4.1.conv2.weight"],
                       reference["layer4.1.conv2.weight"])
    assert "fc.weight" not in backbone.state_dict()


def test_offline_error_names_file_and_folder(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedError) as info:
        pretrained_state("resnet50")
    message = str(info.value)
    assert "\n" not in message and "name resolution" in message
    assert "place resnet50-" in message and str(tmp_path / "hub" / "checkpoints") in message


def test_config_accepts_library_names_and_checks_pretrained() -> None:
    assert load_config("demo", ["model.backbone=timm:vit_small_patch14_dinov2.lvd142m"])
    with pytest.raises(ConfigError, match="model.backbone"):
        load_config("demo", ["model.backbone=res net"])
    with pytest.raises(ConfigError, match="pretext.method"):
        load_config("demo", ["pretext.method=pretrained"])  # resnet_tiny has no library weights
    cfg = load_config("demo", ["pretext.method=pretrained", "model.backbone=resnet50"])
    assert cfg.pretext.method == "pretrained"


def test_input_settings_follow_the_weights() -> None:
    assert input_settings("resnet50") == {"image_size": 224, "resize": 232,
                                          "mean": [0.485, 0.456, 0.406],
                                          "std": [0.229, 0.224, 0.225]}


def hf_cache_with(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """A Hugging Face hub cache holding ``repo``'s model.safetensors, laid out as a download
    leaves it (refs/main names the snapshot)."""
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    return snapshot / "model.safetensors"


def test_timm_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    timm = pytest.importorskip("timm")
    import huggingface_hub.constants as hf

    net = build_backbone("timm:resnet18")
    assert net.out_dim == 512 and net.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 512)
    with pytest.raises(PretrainedError, match="timm has no model"):
        build_backbone("timm:resnet_that_does_not_exist")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 or no network
    name = "timm:test_resnet.r160_in1k"
    started = time.perf_counter()
    with pytest.raises(PretrainedError, match="not in the Hugging Face cache") as info:
        pretrained_state(name)
    assert time.perf_counter() - started < 2  # no minute of hub retries
    assert "\n" not in str(info.value) and str(tmp_path / "hub") in str(info.value)
    torch.manual_seed(0)
    reference = timm.create_model("test_resnet.r160_in1k", num_classes=1000).state_dict()
    path = hf_cache_with(tmp_path / "hub", "timm/test_resnet.r160_in1k", reference)
    assert weights_file(name) == path
    backbone = build_backbone(name)
    load_pretrained(backbone, name)  # from the cache, offline
    key = next(k for k in backbone.state_dict() if k.endswith("conv1.weight"))
    assert torch.equal(backbone.state_dict()[key], reference[key])
    settings = input_settings("timm:resnet18.a1_in1k")
    assert settings["image_size"] == 224 and len(settings["mean"]) == 3


def test_weights_file_finds_torchvision_weights_in_torch_home(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert weights_file("resnet18") is None
    target = tmp_path / "hub" / "checkpoints" / os.path.basename(
        torchvision.models.ResNet18_Weights.DEFAULT.url)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    assert weights_file("resnet18") == target
    assert weights_file("resnet_that_does_not_exist") is None
