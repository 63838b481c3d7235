"""Architectures of the RobustBench model zoo, named "robustbench:<model name>".

The zoo's entries build the architecture only; `core.engine.zoo.load_robustbench_model` adds weights.
"""
from __future__ import annotations

import difflib
import importlib
import sys
from types import ModuleType
from typing import Any

from torch import nn

from core.engine.architectures._registry import register_family
from core.errors import UnsupportedArchitecture

ROBUSTBENCH_DATASETS = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
ROBUSTBENCH_THREAT_MODELS = ("Linf", "L2", "corruptions")
_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "imagenet": 224}


def import_robustbench() -> ModuleType:
    """Import robustbench after making PyPI's `pyautoattack` importable as `autoattack`.

    The robustbench release on PyPI imports `autoattack` and `autoattack.state`, which PyPI's
    pyautoattack installs under its own name; the aliases must exist before robustbench loads.
    """
    if "autoattack" not in sys.modules:
        package = importlib.import_module("pyautoattack")
        importlib.import_module("pyautoattack.state")
        sys.modules["autoattack"] = package
    prefix = "pyautoattack."
    for name, module in list(sys.modules.items()):
        alias = "autoattack." + name[len(prefix):]
        if name.startswith(prefix) and alias not in sys.modules:
            sys.modules[alias] = module
    return importlib.import_module("robustbench")


def robustbench_entry(name: str, *, dataset: str, threat_model: str) -> dict[str, Any]:
    """The zoo's dict for a model (keys 'model', 'gdrive_id'); single models only."""
    if dataset not in ROBUSTBENCH_DATASETS:
        raise UnsupportedArchitecture(f"RobustBench has models for {', '.join(ROBUSTBENCH_DATASETS)}, "
                                      f"not for the data set {dataset!r}.")
    if threat_model not in ROBUSTBENCH_THREAT_MODELS:
        raise UnsupportedArchitecture(f"RobustBench threat models are {', '.join(ROBUSTBENCH_THREAT_MODELS)}, "
                                      f"got {threat_model!r}.")
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    models = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    if name not in models:
        close = difflib.get_close_matches(name, list(models), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnsupportedArchitecture(f"RobustBench has no model {name!r} for {dataset} / {threat_model}.{hint} "
                                      "See robustbench's model zoo for the names.")
    entry: dict[str, Any] = models[name]
    if isinstance(entry.get("gdrive_id"), (list, tuple)):
        raise UnsupportedArchitecture(f"RobustBench's {name} is an ensemble of several checkpoints; "
                                      "ensembles are not supported yet. Pick a single model.")
    return entry


@register_family("robustbench:")
def robustbench_architecture(name: str, *, num_classes: int, in_channels: int, image_size: tuple[int, int],
                             dataset: str, threat_model: str) -> nn.Module:
    entry = robustbench_entry(name, dataset=dataset, threat_model=threat_model)
    size = _IMAGE_SIZE[dataset]
    expected = (ROBUSTBENCH_DATASETS[dataset], 3, (size, size))
    if (num_classes, in_channels, tuple(image_size)) != expected:
        raise UnsupportedArchitecture(
            f"RobustBench's {name} takes 3×{size}×{size} images and predicts "
            f"{expected[0]} classes; this model was declared with {in_channels}×{image_size[0]}×{image_size[1]} "
            f"images and {num_classes} classes.")
    model: nn.Module = entry["model"]()
    return model
