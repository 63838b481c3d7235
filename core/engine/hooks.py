"""The callables a recipe reports through (architecture.md, "The seam")."""
from __future__ import annotations

import time
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


Report = Callable[[float, str], None]   # (share of the work done, the phase now running)


class Stages:
    """Progress through consecutive stages of known relative cost (e.g. forward/backward passes
    per image), so that the share reported, and the ETA estimated from it, moves with the work.

    `stage(weight, phase)` starts the next stage, reports its start, and returns its reporter:
    `(share of this stage done, detail)`, reported as phase "<phase>: <detail>" (just the stage's
    phase without a detail). `report` receives the share of all the stages done, in [0, 1];
    `total` is the sum of the stages' weights."""

    def __init__(self, report: Report, total: float) -> None:
        self.report, self.total, self.done = report, max(float(total), 1e-12), 0.0

    def stage(self, weight: float, phase: str) -> Callable[[float, str | None], None]:
        start, self.done = self.done, self.done + max(float(weight), 0.0)
        end = self.done

        def within(fraction: float, detail: str | None = None) -> None:
            at = start + (end - start) * min(max(fraction, 0.0), 1.0)
            self.report(min(at / self.total, 1.0), f"{phase}: {detail}" if detail else phase)

        within(0.0)
        return within


class Eta:
    """The seconds left, from the rate of progress since the first report: elapsed · (1 − f) / (f − f₀).
    The recipes report step by step, shared out by the work's passes (Stages, the fine-tune's
    schedule), so an estimate exists from the first step on; None before the share has moved."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started: float | None = None
        self.first = 0.0

    def __call__(self, fraction: float) -> float | None:
        now = self.clock()
        if self.started is None:
            self.started, self.first = now, fraction
            return None
        gained = fraction - self.first
        if gained <= 1e-6:
            return None
        return round((now - self.started) * max(1.0 - fraction, 0.0) / gained, 1)
