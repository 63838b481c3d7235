"""A small CNN for small grayscale images (8×8 digits, 28×28 Fashion-MNIST): fast on a CPU."""
from __future__ import annotations

import torch
from torch import nn

from core.engine.architectures._layers import input_normalization
from core.engine.architectures._registry import register_architecture


class SmallCNN(nn.Module):
    """conv-conv-pool-conv, pooled to a 4×4 grid, then a two-layer classifier.

    The adaptive pooling makes it take any image size ≥ 8 (8×8 inputs reach it already 4×4).
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, width: int = 16, hidden: int = 64,
                 normalize: nn.Module | None = None) -> None:
        super().__init__()
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(self.normalize(x)))
        return logits


@register_architecture("small-cnn")
def small_cnn(*, num_classes: int, in_channels: int, image_size: tuple[int, int], dataset: str,
              threat_model: str) -> nn.Module:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels,
                    normalize=input_normalization(dataset, in_channels))
