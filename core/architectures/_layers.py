"""Pieces shared by the architecture families: input normalisation and weight initialisation."""
from __future__ import annotations

import torch
from torch import nn

# Per-channel statistics of the training sets (the values used throughout the robustness literature).
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class InputNormalization(nn.Module):
    """(x - mean) / std inside the model, so that the model's input is the image in [0, 1].

    The buffers are not persistent: they follow from the data set, and state dicts stay the
    plain weights a user trained.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def input_normalization(dataset: str, in_channels: int) -> nn.Module:
    """The normalisation for a known data set's images; identity otherwise."""
    stats = DATASET_STATS.get(dataset)
    if stats is None or len(stats[0]) != in_channels:
        return nn.Identity()
    return InputNormalization(*stats)


def init_weights(module: nn.Module) -> None:
    """He initialisation for convolutions (as in the ResNet papers), unit BN, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
