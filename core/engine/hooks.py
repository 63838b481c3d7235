"""The callables a recipe reports through (architecture.md, "The seam")."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _no_progress(fraction: float, phase: str, metrics: dict[str, Any]) -> None:
    return None


def _never_stop() -> bool:
    return False


def _drop_checkpoint(state: Any) -> None:
    return None


def _drop_event(type: str, message: str, data: dict[str, Any]) -> None:
    return None


def _no_warning(message: str, data: dict[str, Any]) -> None:
    return None


@dataclass
class Hooks:
    """progress(fraction in [0,1], phase, metrics); should_stop() checked every few steps;
    checkpoint(state) receives a `core.engine.checkpoint.TrainingCheckpoint` after every epoch;
    event(type, message, data) records something the user should know (e.g. a "warning" that a
    batch was halved after a CUDA out-of-memory error); warn(message, data) is told, when it
    happens, what the result's `warnings` will list."""

    progress: Callable[[float, str, dict[str, Any]], None] = field(default=_no_progress)
    should_stop: Callable[[], bool] = field(default=_never_stop)
    checkpoint: Callable[[Any], None] = field(default=_drop_checkpoint)
    event: Callable[[str, str, dict[str, Any]], None] = field(default=_drop_event)
    warn: Callable[[str, dict[str, Any]], None] = field(default=_no_warning)
