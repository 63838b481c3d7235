"""Architecture names and their `source:` prefix, parsed in one place.

A name is a built-in one ("small-cnn", "wide-resnet-28-10") or `family:rest`: "robustbench:
<model name>", "timm:<timm model name>" or "torchvision:<classification model name>". A Hub
registration carries "timm:hf-hub:<org>/<repo>[@revision]" until its config is read. The API
(torch-free), the worker and the engine's registry all read names through `parse_architecture`.
This module imports nothing, so any layer may use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Architectures the zoo builds itself (core/engine/zoo.py registers exactly these names).
BUILTIN_ARCHITECTURES: Final[tuple[str, ...]] = (
    "small-cnn", "preact-resnet-18", "wide-resnet-28-10", "wide-resnet-34-10",
)
FAMILIES: Final[tuple[str, ...]] = ("robustbench", "timm", "torchvision")
ROBUSTBENCH_PREFIX: Final = "robustbench:"
FAMILY_PREFIXES: Final[tuple[str, ...]] = tuple(f"{family}:" for family in FAMILIES)
# timm reads "hf-hub:<repo>" (also "hf_hub:") as a model on the Hugging Face Hub.
HUB_PREFIX: Final = "timm:hf-hub:"
_HUB_NAMES: Final = ("hf-hub:", "hf_hub:")


@dataclass(frozen=True)
class ArchitectureName:
    """A parsed name: `family` is None for a built-in (or unknown) name, and `name` is what
    follows the family's prefix (the whole name without one)."""

    family: str | None
    name: str

    @property
    def is_hub(self) -> bool:
        """A timm name that points at the Hugging Face Hub (timm:hf-hub:<repo>)."""
        return self.family == "timm" and self.name.startswith(_HUB_NAMES)

    def __str__(self) -> str:
        return f"{self.family}:{self.name}" if self.family else self.name


def parse_architecture(text: str) -> ArchitectureName:
    """Split `text` at its family prefix; a prefix with nothing after it is no family."""
    family, colon, rest = text.partition(":")
    if colon and family in FAMILIES and rest:
        return ArchitectureName(family, rest)
    return ArchitectureName(None, text)


def is_known_architecture_name(text: str) -> bool:
    """Cheap, torch-free check the API runs before storing an upload (the worker checks the
    family's own names and suggests close ones)."""
    return text in BUILTIN_ARCHITECTURES or parse_architecture(text).family is not None


def robustbench_architecture(model_name: str) -> str:
    """The architecture name of a RobustBench zoo model."""
    return ROBUSTBENCH_PREFIX + model_name
