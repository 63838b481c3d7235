"""Pre-activation ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks", 2016).

The CIFAR variant: a 3×3 stem without pooling, four stages of two blocks (64, 128, 256, 512
channels; strides 1, 2, 2, 2), a final BN-ReLU, global average pooling and a linear layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.engine.architectures._layers import init_weights, input_normalization
from core.engine.architectures._registry import register_architecture


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-conv3×3 plus the identity (a 1×1 projection when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection sees the pre-activated input, as in the paper's full pre-activation unit.
        identity = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        residual: torch.Tensor = out + identity
        return residual


class PreActResNet(nn.Module):
    def __init__(self, *, blocks: tuple[int, ...] = (2, 2, 2, 2), widths: tuple[int, ...] = (64, 128, 256, 512),
                 num_classes: int = 10, in_channels: int = 3, normalize: nn.Module | None = None) -> None:
        super().__init__()
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        stages = []
        in_planes = widths[0]
        for i, (count, planes) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(count):
                layers.append(PreActBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(self.normalize(x)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        logits: torch.Tensor = self.linear(out)
        return logits


@register_architecture("preact-resnet-18")
def preact_resnet_18(*, num_classes: int, in_channels: int, image_size: tuple[int, int], dataset: str,
                     threat_model: str) -> nn.Module:
    return PreActResNet(blocks=(2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels,
                        normalize=input_normalization(dataset, in_channels))
