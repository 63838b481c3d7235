"""One registry from architecture names to model constructors (in the manner of timm's).

Built-in names map to one constructor each. A family such as "robustbench:" maps a prefix to a
resolver that receives the rest of the name. `core.engine.zoo.create_model` is the only entry point
that callers use; this module only records and looks up.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Protocol, TypedDict

from torch import nn

from core.errors import UnsupportedArchitecture


# Constructors receive image_size as (height, width).
class ModelConstructor(Protocol):
    def __call__(self, *, num_classes: int, in_channels: int, image_size: tuple[int, int], dataset: str,
                 threat_model: str) -> nn.Module: ...


class BuildArgs(TypedDict):
    """What every constructor and family resolver is called with."""

    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    dataset: str
    threat_model: str


class FamilyResolver(Protocol):
    def __call__(self, name: str, *, num_classes: int, in_channels: int, image_size: tuple[int, int],
                 dataset: str, threat_model: str) -> nn.Module: ...


_architectures: dict[str, ModelConstructor] = {}
_families: dict[str, FamilyResolver] = {}


def register_architecture(name: str) -> Callable[[ModelConstructor], ModelConstructor]:
    """Decorator: register a constructor under `name` (keyword arguments as in ModelConstructor)."""
    def decorate(constructor: ModelConstructor) -> ModelConstructor:
        if name in _architectures:
            raise ValueError(f"architecture {name!r} is registered twice")
        _architectures[name] = constructor
        return constructor
    return decorate


def register_family(prefix: str) -> Callable[[FamilyResolver], FamilyResolver]:
    """Decorator: names starting with `prefix` go to this resolver with the prefix removed."""
    def decorate(resolver: FamilyResolver) -> FamilyResolver:
        if prefix in _families:
            raise ValueError(f"architecture family {prefix!r} is registered twice")
        _families[prefix] = resolver
        return resolver
    return decorate


def list_architectures() -> list[str]:
    """The names registered one by one (families such as robustbench:<name> are not listed)."""
    return sorted(_architectures)


def list_families() -> list[str]:
    return sorted(_families)


def build(name: str, *, num_classes: int, in_channels: int, image_size: tuple[int, int], dataset: str,
          threat_model: str) -> nn.Module:
    kwargs = BuildArgs(num_classes=num_classes, in_channels=in_channels, image_size=image_size, dataset=dataset,
                       threat_model=threat_model)
    if name in _architectures:
        return _architectures[name](**kwargs)
    for prefix, resolver in _families.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return resolver(name[len(prefix):], **kwargs)
    known = ", ".join(list_architectures() + [f"{p}<model name>" for p in list_families()])
    close = difflib.get_close_matches(name, list_architectures(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnsupportedArchitecture(f"unknown architecture {name!r}.{hint} Known architectures: {known}.")
