"""Model architectures, one module per family; importing the package registers them all.

Use `core.engine.zoo.create_model(name, ...)`; the classes are exported so that tests and benchmarks
can build small variants (e.g. WideResNet(depth=10, widen_factor=1)).
"""
from core.engine.architectures._registry import (
    list_architectures,
    list_families,
    register_architecture,
    register_family,
)
from core.engine.architectures.preact_resnet import PreActResNet
from core.engine.architectures.robustbench_zoo import import_robustbench, robustbench_entry
from core.engine.architectures.small_cnn import SmallCNN
from core.engine.architectures.timm_family import timm_architecture
from core.engine.architectures.torchvision_family import torchvision_architecture
from core.engine.architectures.wide_resnet import WideResNet

__all__ = [
    "PreActResNet", "SmallCNN", "WideResNet", "import_robustbench", "list_architectures", "list_families",
    "register_architecture", "register_family", "robustbench_entry", "timm_architecture", "torchvision_architecture",
]
