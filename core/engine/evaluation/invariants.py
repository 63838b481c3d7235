"""Invariants every report must satisfy, checked by the recipes on each report they build.

W2 ≤ pointwise at the same δ and ground cost: the W2 ball with ground cost r at δ contains the
pointwise r-ball at δ, and the pointwise attack's set is a member of every W2 measurement (the
ensemble's `members`, the validation's minimum), so a report stating W2 above l∞ is a bug.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SLACK = 1e-9


class ReportInvariantError(AssertionError):
    """A report contradicts the mathematics; it is never handed out."""


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * max(1.0, abs(b))


def w2_above_pointwise(report: dict[str, Any]) -> tuple[list[str], int]:
    """(violations, pairs compared) over every place a report states both numbers as measured
    numbers: an evaluation's per-radius rows and its summary, a fine-tune's before/after. (The
    per-epoch validation rows are the selection's cheap W-PGD and PGD, run apart: not checked.)"""
    bad: list[str] = []
    checked = 0
    for row in report.get("w2") or []:
        ground = str(row.get("threat", "w2-linf")).removeprefix("w2-")
        for p in report.get("pointwise") or []:
            if p.get("threat") == ground and _same(p["delta"], row["delta"]):
                checked += 1
                if row["robust_accuracy"] > p["robust_accuracy"] + SLACK:
                    bad.append(f"W2 {row['robust_accuracy']} above {p['attack']} {p['robust_accuracy']} at "
                               f"δ={row['delta']}")
    rows: Iterable[Any] = [report.get("summary"), report.get("before"), report.get("after")]
    for m in rows:
        if not isinstance(m, dict):
            continue
        w2 = m.get("w2_robust_accuracy")
        for ground in ("linf", "l2"):
            point = m.get(f"{ground}_robust_accuracy")
            if not (isinstance(w2, (int, float)) and isinstance(point, (int, float))):
                continue
            if m.get("w2_threat", f"w2-{ground}") != f"w2-{ground}":
                continue
            checked += 1
            if w2 > point + SLACK:
                bad.append(f"W2 {w2} above {ground} {point} (epoch {m.get('epoch', '-')})")
    return bad, checked


def check_report(report: dict[str, Any]) -> dict[str, Any]:
    """`report` unchanged when it keeps the invariants; ReportInvariantError naming the rows otherwise."""
    bad, _ = w2_above_pointwise(report)
    if bad:
        raise ReportInvariantError("the report contradicts W2 ≤ pointwise at the same δ: " + "; ".join(bad))
    return report
