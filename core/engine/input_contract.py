"""What a registered model takes as input, without torch (the API resolves the defaults).

Every attack and every δ acts on images with pixels in [0, 1]. A model trained on normalised
inputs states its per-channel `input_mean` and `input_std`; the engine then feeds it
(x - mean) / std (core.engine.architectures._layers.PixelInputModel). Defaults:
- built-in and RobustBench architectures normalise inside the network already: identity;
- timm: and torchvision: architectures: the statistics of the data set the model was
  trained on when it is a known one (cifar10, cifar100, imagenet) with as many channels, else identity;
- Hugging Face Hub models: the mean and std of the hub's config.json (filled in by the worker).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

# Per-channel statistics of the training sets (the values used throughout the robustness literature).
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # torchvision's and timm's ImageNet statistics: what most pretrained classifiers expect
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# The data sets whose statistics the built-in architectures apply inside the network.
BUILTIN_NORMALIZED_DATASETS = ("cifar10", "cifar100")
# Architecture families that take the network's raw input: the engine normalises for them.
EXTERNAL_FAMILIES = ("timm:", "torchvision:")


def is_identity(mean: Sequence[float] | None, std: Sequence[float] | None) -> bool:
    return (mean is None or all(m == 0 for m in mean)) and (std is None or all(s == 1 for s in std))


def default_input_stats(architecture: str, dataset: str, channels: int) -> tuple[list[float], list[float]]:
    """(mean, std) for a registration that states neither (see the module's docstring)."""
    stats = DATASET_STATS.get(dataset)
    if architecture.startswith(EXTERNAL_FAMILIES) and stats is not None and len(stats[0]) == channels:
        return list(stats[0]), list(stats[1])
    return [0.0] * channels, [1.0] * channels


def check_input_stats(mean: Sequence[float], std: Sequence[float], channels: int) -> str | None:
    """What is wrong with a stated mean/std for `channels` input channels, or None."""
    if len(mean) != channels or len(std) != channels:
        return (f"input_mean and input_std need one value per input channel ({channels}), "
                f"got {len(mean)} and {len(std)} values")
    if not all(math.isfinite(v) for v in (*mean, *std)):
        return "input_mean and input_std must be finite numbers"
    if any(s <= 0 for s in std):
        return "every input_std value must be > 0"
    if any(abs(m) > 1e3 or s > 1e3 for m, s in zip(mean, std, strict=True)):
        return ("input_mean and input_std are per-channel statistics of [0, 1] pixels; "
                "values over 1000 are not plausible")
    return None
