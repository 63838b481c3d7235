"""How many devices one job may train on at this worker, said in its heartbeat row.

A GPU worker offers the GPUs it sees (torch.cuda.device_count(), after CUDA_VISIBLE_DEVICES); a
CPU-only worker runs DDP ranks as gloo processes and offers one per CPU core it may use (more
ranks than cores only share the cores, at the memory cost of one process each). The API refuses a
submit asking for more than any live worker offers, and the task refuses it again before it
starts a process (worker/ddp.py).

The worker's parent process must not touch CUDA (its pool forks), so it learns its devices from
`python -m worker.devices`, run once, which prints {"devices": n, "device_type": "cuda"|"cpu"}.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

log = logging.getLogger("robustify.worker")

PROBE_TIMEOUT_SECONDS = 120.0   # importing torch on a busy machine


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


def probe_capacity() -> tuple[int, str] | None:
    """device_capacity() measured in a fresh interpreter (no CUDA in the caller); None when the
    probe fails (the heartbeat then says nothing, and the API cannot refuse by it)."""
    try:
        out = subprocess.run([sys.executable, "-m", "worker.devices"], capture_output=True, text=True,
                             timeout=PROBE_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL, check=True).stdout
        found = json.loads(out)
        return int(found["devices"]), str(found["device_type"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as exc:
        log.warning("could not learn this worker's devices (%s: %s); its heartbeat will not state them",
                    type(exc).__name__, exc)
        return None


if __name__ == "__main__":
    devices, device_type = device_capacity()
    json.dump({"devices": devices, "device_type": device_type}, sys.stdout)
