"""Wide residual networks (Zagoruyko & Komodakis, "Wide Residual Networks", 2016).

WRN-d-k: a 3×3 stem with 16 channels, then three groups of (d-4)/6 pre-activation blocks with
16k, 32k and 64k channels (strides 1, 2, 2), a final BN-ReLU, global average pooling and a
linear layer. Small variants (e.g. WideResNet(depth=10, widen_factor=1)) serve tests and benchmarks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.engine.architectures._layers import init_weights, input_normalization
from core.engine.architectures._registry import ModelConstructor, register_architecture


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3 plus the identity or a 1×1 projection."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        identity = self.shortcut(out) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(out)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        residual: torch.Tensor = self.conv2(out) + identity
        return residual


class WideResNet(nn.Module):
    def __init__(self, *, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.0, normalize: nn.Module | None = None) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"a WideResNet's depth is 6n+4 with n ≥ 1 (10, 16, 22, 28, 34, ...), got {depth}")
        blocks_per_group = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        groups = []
        in_planes = 16
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(blocks_per_group):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(WideBasicBlock(in_planes, planes, stride, dropout))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.groups(self.conv1(self.normalize(x)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        logits: torch.Tensor = self.fc(out)
        return logits


def _wide_resnet(depth: int, widen_factor: int) -> ModelConstructor:
    def construct(*, num_classes: int, in_channels: int, image_size: tuple[int, int], dataset: str,
                  threat_model: str) -> nn.Module:
        return WideResNet(depth=depth, widen_factor=widen_factor, num_classes=num_classes, in_channels=in_channels,
                          normalize=input_normalization(dataset, in_channels))
    construct.__name__ = f"wide_resnet_{depth}_{widen_factor}"
    return construct


register_architecture("wide-resnet-28-10")(_wide_resnet(28, 10))
register_architecture("wide-resnet-34-10")(_wide_resnet(34, 10))
