"""How many devices one job may train on at this worker, said in its heartbeat row.

A GPU worker offers the GPUs it sees (torch.cuda.device_count(), after CUDA_VISIBLE_DEVICES); a
CPU-only worker runs DDP ranks as gloo processes and offers one per CPU core it may use (more
ranks than cores only share the cores, at the memory cost of one process each). The API refuses a
submit asking for more than any live worker offers, and the task refuses it again before it
starts a process (worker/ddp.py).

The worker's parent process must not touch CUDA (its pool forks), so it learns its devices from
`python -m worker.devices`, run once, which prints {"devices": n, "device_type": "cuda"|"cpu",
"calibration": {...}}. The calibration times a few forward/backward passes of the reference
architecture at the reference input size (core.engine.estimate.REFERENCE) on the device a job runs
on, with the threads a job gets: the cost of one image-pass on this worker, from which the API
estimates a job's run time before it is submitted (core.engine.estimate).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("robustify.worker")

PROBE_TIMEOUT_SECONDS = 120.0   # importing torch on a busy machine
CALIBRATION_PASSES = 5          # timed forward/backward passes (after one warm-up); the median counts


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # no affinity on this platform
        return os.cpu_count() or 1


def device_capacity() -> tuple[int, str]:
    """(devices, type) in this process: the visible GPUs, else the CPU cores. Imports torch."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "cuda"
    return cpu_cores(), "cpu"


def device_name(device_type: str) -> str:
    """The GPU's name, or the CPU's model with the threads a job gets. Imports torch."""
    import torch

    from core.engine.provenance import cpu_name

    if device_type == "cuda":
        return str(torch.cuda.get_device_name(0))
    return f"{cpu_name()}, {torch.get_num_threads()} thread(s)"


def device_class(device_type: str) -> str:
    """The class the estimate groups workers by: "cpu", or "cuda:" and the GPU's name."""
    return f"cuda:{device_name('cuda')}" if device_type == "cuda" else "cpu"


def calibrate(device_type: str) -> dict[str, Any]:
    """Time forward/backward passes of the reference (core.engine.estimate.REFERENCE) on this
    device: the seconds of one image-pass, with what was timed. Imports torch."""
    import torch
    import torch.nn.functional as F

    from core.engine.estimate import REFERENCE
    from core.engine.zoo import create_model

    ref = REFERENCE[device_type]
    device = torch.device(device_type)
    channels, height, width = ref["input_shape"]
    batch = int(ref["batch"])
    torch.manual_seed(0)
    model = create_model(ref["architecture"], num_classes=10, in_channels=channels,
                         image_size=(height, width)).to(device).train()
    x = torch.rand(batch, channels, height, width, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def one_pass() -> float:
        t = time.perf_counter()
        images = x.clone().requires_grad_(True)      # the attacks' input gradient and the weights' both
        F.cross_entropy(model(images), y).backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    one_pass()                                       # warm-up: allocation, cuDNN's choice of kernels
    seconds = statistics.median(one_pass() for _ in range(CALIBRATION_PASSES))
    return {"device_class": device_class(device_type), "device_type": device_type,
            "device_name": device_name(device_type),
            "reference": {**ref, "params": sum(p.numel() for p in model.parameters()),
                          "passes": CALIBRATION_PASSES, "seconds_per_unit": seconds / batch},
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}


def probe() -> dict[str, Any] | None:
    """device_capacity() and calibrate() measured in a fresh interpreter (no CUDA in the caller):
    {"devices", "device_type", "calibration"}; None when the probe fails (the heartbeat then says
    nothing, the API cannot refuse by it and estimates without this worker)."""
    try:
        out = subprocess.run([sys.executable, "-m", "worker.devices"], capture_output=True, text=True,
                             timeout=PROBE_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL, check=True).stdout
        found = json.loads(out)
        return {"devices": int(found["devices"]), "device_type": str(found["device_type"]),
                "calibration": found.get("calibration")}
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as exc:
        log.warning("could not learn this worker's devices (%s: %s); its heartbeat will not state them",
                    type(exc).__name__, exc)
        return None


def probe_capacity() -> tuple[int, str] | None:
    """(devices, type) of probe()."""
    found = probe()
    return None if found is None else (found["devices"], found["device_type"])


def main() -> None:
    devices, device_type = device_capacity()
    found: dict[str, Any] = {"devices": devices, "device_type": device_type}
    try:
        found["calibration"] = calibrate(device_type)
    except Exception as exc:  # noqa: BLE001 - the device count still counts without a calibration
        print(f"calibration failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        found["calibration"] = None
    json.dump(found, sys.stdout)


if __name__ == "__main__":
    main()
