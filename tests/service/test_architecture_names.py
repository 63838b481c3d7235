"""The one parser of architecture names (core/engine/architecture_names.py), torch-free."""
from __future__ import annotations

import subprocess
import sys

import pytest

from core.engine.architecture_names import ArchitectureName, is_known_architecture_name, parse_architecture


@pytest.mark.parametrize(("text", "family", "name"), [
    ("small-cnn", None, "small-cnn"),
    ("robustbench:Wang2023Better_WRN-28-10", "robustbench", "Wang2023Better_WRN-28-10"),
    ("timm:resnet18.a1_in1k", "timm", "resnet18.a1_in1k"),
    ("torchvision:resnet18", "torchvision", "resnet18"),
    ("timm:hf-hub:timm/resnet18.a1_in1k@main", "timm", "hf-hub:timm/resnet18.a1_in1k@main"),
    ("timm:", None, "timm:"),              # a prefix with nothing after it names nothing
    ("keras:resnet", None, "keras:resnet"),  # not a family
])
def test_a_name_splits_at_its_family_prefix(text: str, family: str | None, name: str) -> None:
    parsed = parse_architecture(text)
    assert parsed == ArchitectureName(family, name) and str(parsed) == text


def test_known_names_and_hub_names() -> None:
    assert is_known_architecture_name("wide-resnet-28-10") and is_known_architecture_name("torchvision:vgg11")
    assert not is_known_architecture_name("resnet18") and not is_known_architecture_name("robustbench:")
    assert parse_architecture("timm:hf-hub:org/repo").is_hub and parse_architecture("timm:hf_hub:org/repo").is_hub
    assert not parse_architecture("timm:resnet18").is_hub and not parse_architecture("hf-hub:org/repo").is_hub


def test_the_parser_needs_no_torch() -> None:
    code = "import sys, core.engine.architecture_names; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
