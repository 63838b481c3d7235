"""Model architectures, one module per family; importing the package registers them all.

Use `core.zoo.create_model(name, ...)`; the classes are exported so that tests and benchmarks
can build small variants (e.g. WideResNet(depth=10, widen_factor=1)).
"""
from core.architectures._registry import list_architectures, list_families, register_architecture, register_family
from core.architectures.preact_resnet import PreActResNet
from core.architectures.robustbench_zoo import import_robustbench, robustbench_entry
from core.architectures.small_cnn import SmallCNN
from core.architectures.timm_family import timm_architecture
from core.architectures.torchvision_family import torchvision_architecture
from core.architectures.wide_resnet import WideResNet

__all__ = [
    "PreActResNet", "SmallCNN", "WideResNet", "import_robustbench", "list_architectures", "list_families",
    "register_architecture", "register_family", "robustbench_entry", "timm_architecture", "torchvision_architecture",
]
