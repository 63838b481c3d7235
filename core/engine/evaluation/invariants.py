"""Invariants every report must satisfy, checked by the recipes on each report they build.

W2 ≤ pointwise at the same δ and ground cost: the W2 ball with ground cost r at δ contains the
pointwise r-ball at δ, and the pointwise attack's set is a member of every W2 measurement (the
ensemble's `members`, the validation's minimum), so a report stating W2 above l∞ is a bug.

Common corruptions: every (type, severity) asked is measured or skipped with its reason, so that a
corruption that cannot apply is never dropped silently.
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
    numbers: an evaluation's per-radius rows and its summary, a fine-tune's before/after and its
    per-epoch validation rows (`history`, `validation`). A validation row states W2 as the smaller
    of W-PGD's and PGD's when it carries `w2_wpgd_robust_accuracy`; a row of an older checkpoint,
    without it, measured them apart and is not checked."""
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
    validation = report.get("validation")
    per_epoch = [*(report.get("history") or []), *(validation.values() if isinstance(validation, dict) else [])]
    rows: Iterable[Any] = [report.get("summary"), report.get("before"), report.get("after"),
                           *(r for r in per_epoch if isinstance(r, dict) and "w2_wpgd_robust_accuracy" in r)]
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


def corruption_cells_unaccounted(report: dict[str, Any]) -> list[str]:
    """Every (type, severity) a corruption block was asked for is measured or listed as skipped
    with a reason, never both and never neither (core.engine.evaluation.corruptions)."""
    bad: list[str] = []
    blocks = [("corruptions", report.get("corruptions"))] + [
        (f"{which}.corruptions", (report.get(which) or {}).get("corruptions")) for which in ("before", "after")]
    for where, block in blocks:
        if not isinstance(block, dict):
            continue
        asked = {(t, s) for t in block.get("types", []) for s in block.get("severities", [])}
        measured = [(r["type"], r["severity"]) for r in block.get("rows", [])]
        skipped = [(r["type"], r["severity"]) for r in block.get("skipped", []) if r.get("reason")]
        if set(measured) & set(skipped) or len(measured) + len(skipped) != len(asked) \
                or set(measured) | set(skipped) != asked:
            bad.append(f"{where}: {len(asked)} cells asked, {len(measured)} measured, {len(skipped)} skipped with a "
                       "reason")
    return bad


def check_report(report: dict[str, Any]) -> dict[str, Any]:
    """`report` unchanged when it keeps the invariants; ReportInvariantError naming the rows otherwise."""
    bad, _ = w2_above_pointwise(report)
    if bad:
        raise ReportInvariantError("the report contradicts W2 ≤ pointwise at the same δ: " + "; ".join(bad))
    unaccounted = corruption_cells_unaccounted(report)
    if unaccounted:
        raise ReportInvariantError("corruption cells neither measured nor skipped with a reason: "
                                   + "; ".join(unaccounted))
    return report
