"""Checks every report the suite produces must pass, shared by the engine, service and e2e tests."""
from __future__ import annotations

from typing import Any

SLACK = 1e-9


def assert_w2_not_above_pointwise(report: dict[str, Any]) -> int:
    """W2 robust accuracy ≤ pointwise robust accuracy at the same δ and ground cost, in every place
    a report states both: an evaluation's per-radius rows and its summary, and a fine-tune's
    before/after (the W2 ball with ground cost r at δ contains the pointwise r-ball at δ, and the
    pointwise attack's set is a member of the W2 ensemble). Raises AssertionError naming the row;
    returns how many pairs it compared (a caller can insist on some)."""
    checked = 0
    for row in report.get("w2") or []:
        ground = str(row.get("threat", "w2-linf")).removeprefix("w2-")
        for p in report.get("pointwise") or []:
            if p.get("threat") == ground and abs(p["delta"] - row["delta"]) <= 1e-12 * max(1.0, row["delta"]):
                assert row["robust_accuracy"] <= p["robust_accuracy"] + SLACK, (
                    f"W2 {row['robust_accuracy']} above {p['attack']} {p['robust_accuracy']} at δ={row['delta']}")
                checked += 1
    metrics = [report.get("summary") or {}, report.get("before") or {}, report.get("after") or {}]
    for m in metrics:
        w2 = m.get("w2_robust_accuracy")
        for ground in ("linf", "l2"):
            point = m.get(f"{ground}_robust_accuracy")
            numbers = isinstance(w2, (int, float)) and isinstance(point, (int, float))
            if numbers and m.get("w2_threat", f"w2-{ground}") == f"w2-{ground}":
                assert w2 <= point + SLACK, f"W2 {w2} above {ground} {point} in {sorted(m)}"
                checked += 1
    return checked
