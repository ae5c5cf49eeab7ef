"""Backbones: ResNet-18 in its CIFAR, STL and ImageNet forms, ResNet-50, and a tiny ResNet.

All return pooled features ``[B, out_dim]``; the classifier layer of torchvision's ResNet is
replaced by an identity so the same module serves the pretext, clustering and self-label models.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock


def build_backbone(name: str, width: int = 32) -> nn.Module:
    """Return a backbone with an ``out_dim`` attribute (feature size after pooling)."""
    if name == "resnet18_cifar":
        # 32x32 inputs: a 7x7 stride-2 stem and max-pool would leave 1x1 maps at the last stage,
        # so the CIFAR variant uses a 3x3 stride-1 stem and no max-pool.
        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        return _strip_classifier(net, 512)
    if name == "resnet18_stl":
        # 96x96 inputs, as the authors' released STL-10 model (README, "Choices where the sources
        # differ"): a 3x3 stride-1 stem, then a 2x2 max-pool of stride 2 with padding 1 (96 ->
        # 49 px), so the four stages run at 49, 25, 13 and 7 px and the average pool sees a 7x7
        # map. torchvision's 7x7/2 stem with its 3x3 pool ("resnet18") would leave a 3x3 map.
        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.MaxPool2d(kernel_size=2, stride=2, padding=1)
        return _strip_classifier(net, 512)
    if name == "resnet18":
        return _strip_classifier(resnet18(weights=None), 512)
    if name == "resnet50":
        return _strip_classifier(resnet50(weights=None), 2048)
    if name == "resnet_tiny":
        return TinyResNet(width)
    from scanclust.models.pretrained import library_backbone  # torchvision and timm: by name

    return library_backbone(name)


def _strip_classifier(net: nn.Module, out_dim: int) -> nn.Module:
    net.fc = nn.Identity()
    net.out_dim = out_dim
    return net


class TinyResNet(nn.Module):
    """Three residual stages of torchvision's BasicBlock (widths w, 2w, 4w).

    For tests and the CPU demo: small enough to train in seconds, yet the same kind of network
    (residual blocks, batch norm) as the paper's ResNet-18.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True))
        self.stages = nn.Sequential(
            BasicBlock(width, width),
            _down_block(width, 2 * width),
            _down_block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)


def _down_block(cin: int, cout: int) -> BasicBlock:
    downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))
    return BasicBlock(cin, cout, stride=2, downsample=downsample)
