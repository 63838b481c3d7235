"""The run-time estimate a submit answers with, as one line of text (docs/runtimes.md)."""
from __future__ import annotations

from typing import Any


def duration(seconds: float) -> str:
    """12 s, 3.5 min, 1.9 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_line(estimate: dict[str, Any] | None) -> str | None:
    """`estimate: cpu about 3.5 min (measured, 1 live worker); cuda:… about 20 s (scaled, …)`, the
    reason when there is none, or None for a job submitted before estimates."""
    if not estimate:
        return None
    devices = estimate.get("devices") or {}
    if not devices:
        return f"estimate: none ({estimate.get('reason') or 'no worker has calibrated yet'})"
    parts = [f"{name} about {duration(float(d['seconds']))} ({d['basis']}, {d['workers_seen']} live worker(s))"
             for name, d in devices.items()]
    return "estimate on an idle worker: " + "; ".join(parts)
