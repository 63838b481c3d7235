"""timm's architectures, named "timm:<model name>" (any name timm.list_models() knows).

Built with the registration's class count and input channels (timm's own `num_classes` and
`in_chans`) and random weights: the weights come from the user's safetensors file, whose keys
are timm's own (`model.state_dict()`). A pretrained tag ("resnet18.a1_in1k") names the same
architecture. Models with a fixed input size (vision transformers and the like) are built for
the registration's image size. Hugging Face Hub models go through core.engine.hub.
"""
from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from core.engine.architectures._registry import register_family
from core.errors import UnsupportedArchitecture

PREFIX = "timm:"


def _import_timm() -> Any:   # timm has no type information
    import timm

    return timm


def check_timm_name(name: str) -> None:
    """UnsupportedArchitecture with timm's closest names when timm does not know `name`."""
    timm = _import_timm()
    if name.startswith("hf-hub:") or name.startswith("hf_hub:"):
        raise UnsupportedArchitecture(
            f"{PREFIX}{name} is a Hugging Face Hub model: register it with a JSON body "
            '{"source": "hf-hub", "name": "<org>/<repo>", ...}; to upload your own weights for its '
            "architecture, name the architecture timm:<architecture in the hub's config.json>.")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.lower(), timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise UnsupportedArchitecture(f"timm has no model {name!r}.{hint} "
                                      "GET /v1/architectures?family=timm&q=<part of a name> lists timm's names.")


@register_family(PREFIX)
def timm_architecture(name: str, *, num_classes: int, in_channels: int, image_size: tuple[int, int],
                      dataset: str, threat_model: str) -> nn.Module:
    check_timm_name(name)
    timm = _import_timm()
    from timm.models import get_pretrained_cfg

    height, width = image_size
    kwargs: dict[str, object] = {}
    cfg = get_pretrained_cfg(name)
    # Only models that fix their input size (patch embeddings, position tables) take img_size.
    if cfg is not None and cfg.fixed_input_size and tuple(cfg.input_size[1:]) != (height, width):
        kwargs["img_size"] = (height, width)
    model: nn.Module = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                         **kwargs)
    return model
