"""Where a result came from: software versions, the device, and when it was computed."""
from __future__ import annotations

import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def utc_timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime_provenance(device: torch.device) -> dict[str, Any]:
    """robustify and torch versions and the device (with the GPU's name on CUDA)."""
    name = str(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name += f" ({torch.cuda.get_device_name(device)})"
    return {"robustify_version": _version("robustify"), "torch_version": torch.__version__, "device": name}
