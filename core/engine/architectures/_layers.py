"""Pieces shared by the architecture families: input normalisation and weight initialisation."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from core.engine.input_contract import BUILTIN_NORMALIZED_DATASETS, DATASET_STATS, is_identity


class InputNormalization(nn.Module):
    """(x - mean) / std inside the model, so that the model's input is the image in [0, 1].

    The buffers are not persistent: they follow from the data set, and state dicts stay the
    plain weights a user trained.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def input_normalization(dataset: str, in_channels: int) -> nn.Module:
    """The normalisation for a known data set's images; identity otherwise."""
    stats = DATASET_STATS.get(dataset) if dataset in BUILTIN_NORMALIZED_DATASETS else None
    if stats is None or len(stats[0]) != in_channels:
        return nn.Identity()
    return InputNormalization(*stats)


class PixelInputModel(nn.Module):
    """A network that expects normalised inputs, made to take pixels in [0, 1]: (x - mean) / std, then the network.

    Attacks, perturbation budgets δ and the data pipeline all work on [0, 1] pixels, so a model
    trained on normalised inputs is wrapped once, here. The state dict is the network's own (the
    same keys as `net.state_dict()`, without the mean and std), so checkpoints load into the
    user's architecture unchanged.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need one value per channel and std > 0, got {list(mean)}, {list(std)}")
        self.net = net
        self.normalize = InputNormalization(tuple(mean), tuple(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(self.normalize(x))
        return out

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)


def with_pixel_input(net: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> nn.Module:
    """`net` taking [0, 1] pixels: wrapped in PixelInputModel unless mean 0 and std 1 (then as it is)."""
    if is_identity(mean, std):
        return net
    channels = len(mean if mean is not None else std)  # type: ignore[arg-type]
    return PixelInputModel(net, list(mean) if mean is not None else [0.0] * channels,
                           list(std) if std is not None else [1.0] * channels)


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
