"""Checks every report the suite produces must pass, shared by the engine, service and e2e tests.

The recipes run the same check on every report they build (core.engine.evaluation.invariants),
so a report that breaks it never leaves the engine; these helpers let a test insist that the
pairs were there to compare.
"""
from __future__ import annotations

from typing import Any

from core.engine.evaluation.invariants import w2_above_pointwise


def assert_w2_not_above_pointwise(report: dict[str, Any]) -> int:
    """W2 robust accuracy ≤ pointwise robust accuracy at the same δ and ground cost, in every place
    a report states both; raises AssertionError naming the rows, returns how many pairs it compared."""
    bad, checked = w2_above_pointwise(report)
    assert not bad, bad
    return checked
