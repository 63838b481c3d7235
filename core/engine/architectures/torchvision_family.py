"""torchvision's classification models, named "torchvision:<model name>" (torchvision.models.list_models).

Built with `weights=None` and the registration's class count; the weights come from the user's
safetensors file with torchvision's own keys (`model.state_dict()`). torchvision builds every
classifier for 3 input channels: for another channel count the first convolution is rebuilt with
that many input channels (same name, kernel, stride and padding), so a state dict must hold that
convolution's weight with the declared channel count (e.g. [64, 1, 7, 7] for a grayscale
resnet18). torchvision's vision transformers (vit_*) are built for the registration's image
size; its other transformers (swin, maxvit) take the size they were designed for.
"""
from __future__ import annotations

import difflib
from typing import cast

from torch import nn

from core.engine.architectures._registry import register_family
from core.errors import UnsupportedArchitecture

PREFIX = "torchvision:"


def classification_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _first_conv_for(model: nn.Module, in_channels: int) -> None:
    """Replace the first nn.Conv2d (the stem) by one with `in_channels` input channels."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
            # a Conv2d keeps its sizes as pairs; torch's annotations say tuples of any length
            kernel, stride, dilation = (cast("tuple[int, int]", v) for v in (module.kernel_size, module.stride,
                                                                              module.dilation))
            padding = cast("str | tuple[int, int]", module.padding)
            setattr(parent, path.rpartition(".")[2], nn.Conv2d(
                in_channels, module.out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
                groups=1 if module.groups == module.in_channels else module.groups, bias=module.bias is not None,
                padding_mode=module.padding_mode))
            return
    raise UnsupportedArchitecture(f"found no convolution to adapt to {in_channels} input channels.")


@register_family(PREFIX)
def torchvision_architecture(name: str, *, num_classes: int, in_channels: int, image_size: tuple[int, int],
                             dataset: str, threat_model: str) -> nn.Module:
    from torchvision.models import get_model

    names = classification_names()
    if name not in names:
        close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise UnsupportedArchitecture(f"torchvision has no classification model {name!r}.{hint} "
                                      "GET /v1/architectures?family=torchvision lists them.")
    height, width = image_size
    kwargs: dict[str, object] = {}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)  # one output in training mode too
    if name.startswith("vit_"):
        if height != width:
            raise UnsupportedArchitecture(f"torchvision's {name} takes square images; got {height}×{width}.")
        kwargs["image_size"] = height
    model: nn.Module = get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _first_conv_for(model, in_channels)
    return model
