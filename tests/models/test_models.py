"""Backbones, the SimCLR and cluster models, and loading foreign backbone weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from scanclust.checkpoint import CheckpointError
from scanclust.models import ClusterModel, ContrastiveModel, backbone_state, build_backbone
from scanclust.models.saved import load_backbone_weights


def test_resnet18_cifar_stem_and_shape() -> None:
    torch.manual_seed(0)
    net = build_backbone("resnet18_cifar").eval()
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert net.out_dim == 512
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def feature_map_sizes(net: nn.Module, side: int) -> list[int]:
    sizes: list[int] = []
    for module in (net.conv1, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4):
        module.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    with torch.no_grad():
        assert net(torch.randn(2, 3, side, side)).shape == (2, 512)
    return sizes


def test_resnet18_stl_is_the_released_stl_model() -> None:
    # 3x3 stride-1 stem, 2x2 max-pool of stride 2 with padding 1: 96 -> 49, then 49, 25, 13, 7.
    net = build_backbone("resnet18_stl").eval()
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert feature_map_sizes(net, 96) == [96, 49, 49, 25, 13, 7]
    # torchvision's ResNet-18 without fc has 11,176,512 weights; the 3x3 stem has
    # 64 * 3 * 9 = 1,728 instead of 64 * 3 * 49 = 9,408.
    assert sum(p.numel() for p in net.parameters()) == 11_176_512 - 9_408 + 1_728


def test_resnet18_keeps_torchvisions_stem() -> None:
    net = build_backbone("resnet18").eval()
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
    assert feature_map_sizes(net, 96) == [48, 24, 24, 12, 6, 3]
    assert sum(p.numel() for p in net.parameters()) == 11_176_512


def test_resnet50_out_dim() -> None:
    torch.manual_seed(0)
    net = build_backbone("resnet50").eval()
    assert net.out_dim == 2048
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 2048)


def test_resnet_tiny_shape() -> None:
    torch.manual_seed(0)
    net = build_backbone("resnet_tiny", width=8)
    assert net.out_dim == 32
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 32)


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="resnet19"):
        build_backbone("resnet19")


def test_contrastive_model_output_is_unit_norm() -> None:
    torch.manual_seed(0)
    model = ContrastiveModel(build_backbone("resnet_tiny", 8), hidden=16, proj_dim=5)
    z = model(torch.randn(3, 3, 16, 16))
    assert z.shape == (3, 5)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))


def test_cluster_model_heads() -> None:
    torch.manual_seed(0)
    model = ClusterModel(build_backbone("resnet_tiny", 8), num_clusters=4, num_heads=3).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (3, 2, 4)
    # head h is rows h*C..(h+1)*C of the joint layer: logits[h] = features @ W_h.T + b_h
    features = model.backbone(x)
    w, b = model.heads.weight[4:8], model.heads.bias[4:8]
    torch.testing.assert_close(logits[1], features @ w.T + b)
    model.keep_head(1)
    assert model.num_heads == 1 and model.heads.weight.shape == (4, model.backbone.out_dim)
    assert torch.equal(model.heads.weight, w) and torch.equal(model.heads.bias, b)
    with torch.no_grad():
        assert model(x).shape == (1, 2, 4)
        torch.testing.assert_close(model(x)[0], logits[1])


def test_backbone_state_transfers_pretext_backbone() -> None:
    torch.manual_seed(0)
    pretext = ContrastiveModel(build_backbone("resnet_tiny", 8), hidden=16, proj_dim=5)
    # one training-mode pass so the batch-norm running statistics are not the defaults
    pretext(torch.randn(4, 3, 16, 16))
    pretext.eval()
    state = backbone_state(pretext.state_dict())
    assert not any(k.startswith(("backbone.", "head.")) for k in state)
    cluster = ClusterModel(build_backbone("resnet_tiny", 8), num_clusters=3).eval()
    cluster.backbone.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(cluster.backbone(x), pretext.backbone(x))


def _moco_file(path: Path, source: nn.Module, drop: str | None = None) -> None:
    state = {f"module.encoder_q.{k}": v for k, v in source.state_dict().items() if k != drop}
    state["module.encoder_q.fc.0.weight"] = torch.randn(4, 32)
    state["module.encoder_q.fc.0.bias"] = torch.randn(4)
    torch.save({"state_dict": state, "epoch": 800, "arch": "tiny"}, path)


def test_load_backbone_weights_from_moco_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_backbone("resnet_tiny", 8)
    path = tmp_path / "moco.pth.tar"
    _moco_file(path, source)
    target = build_backbone("resnet_tiny", 8)
    load_backbone_weights(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_backbone_weights_names_missing_key(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_backbone("resnet_tiny", 8)
    path = tmp_path / "partial.pth.tar"
    _moco_file(path, source, drop="stages.1.conv1.weight")
    with pytest.raises(CheckpointError, match=r"stages\.1\.conv1\.weight"):
        load_backbone_weights(build_backbone("resnet_tiny", 8), path)


def test_load_backbone_weights_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="absent.pth"):
        load_backbone_weights(build_backbone("resnet_tiny", 8), tmp_path / "absent.pth")
