"""The sweep's frontier: the body's validation, the Pareto front and the recommendation rule."""
from __future__ import annotations

from typing import Any

import pydantic
import pytest

from core.engine.recipes.frontier import RecommendRule, SweepSpec, check_rule_measured, frontier
from core.limits import MAX_SWEEP_CHILDREN


def _child(job_id: str, delta: float, clean: float, w2: float, linf: float, *, before_clean: float = 0.95,
           status: str = "succeeded", corruption: float | None = None) -> dict[str, Any]:
    after: dict[str, Any] = {"clean_accuracy": clean, "clean_accuracy_ci95": [clean - 0.02, clean + 0.02],
                             "w2_robust_accuracy": w2, "w2_robust_accuracy_ci95": [w2 - 0.03, w2 + 0.03],
                             "linf_robust_accuracy": linf, "linf_robust_accuracy_ci95": [linf - 0.03, linf + 0.03]}
    if corruption is not None:
        after["corruptions"] = {"mean_accuracy": corruption, "mean_accuracy_ci95": [corruption - 0.01, corruption]}
    before = {"clean_accuracy": before_clean, "w2_robust_accuracy": 0.2, "linf_robust_accuracy": 0.1}
    result = {"before": before, "after": after, "improved": True, "model_id": f"mdl_{job_id}",
              "best_checkpoint_id": f"art_{job_id}"} if status == "succeeded" else None
    return {"job_id": job_id, "status": status, "values": {"delta": delta}, "delta": delta, "result": result}


def test_spec_lists_one_child_per_combination() -> None:
    spec = SweepSpec(delta=[0.1, 0.2], beta=[1.0, 6.0, 3.0])
    assert spec.points() == [{"delta": 0.1, "beta": 1.0}, {"delta": 0.1, "beta": 6.0}, {"delta": 0.1, "beta": 3.0},
                             {"delta": 0.2, "beta": 1.0}, {"delta": 0.2, "beta": 6.0}, {"delta": 0.2, "beta": 3.0}]


@pytest.mark.parametrize(("body", "words"), [
    ({}, "needs values to sweep"),
    ({"delta": []}, "empty list"),
    ({"delta": [0.1, 0.1]}, "twice"),
    ({"delta": [0.0]}, "out of range"),
    ({"delta": [-0.1]}, "out of range"),
    ({"beta": [-1.0]}, "out of range"),
    ({"attack_schedule": ["memory", "memory"]}, "twice"),
    ({"delta": [0.01 * i for i in range(1, MAX_SWEEP_CHILDREN + 2)]}, "the limit is"),
    ({"delta": [0.1], "gamma": [1]}, "Extra inputs"),
])
def test_spec_refuses_bad_lists_with_clear_words(body: dict[str, Any], words: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=words):
        SweepSpec.model_validate(body)


def test_rule_must_be_measured_under_the_threat() -> None:
    assert check_rule_measured(RecommendRule(maximize="l2"), "w2-linf") is not None
    assert check_rule_measured(RecommendRule(maximize="linf"), "w2-linf") is None
    assert check_rule_measured(RecommendRule(maximize="w2"), "l2") is None


def test_pareto_marks_the_undominated_and_the_rule_picks_the_most_robust_within_the_drop() -> None:
    children = [_child("a", 0.05, 0.94, 0.40, 0.30),    # small drop, less robust
                _child("b", 0.1, 0.93, 0.55, 0.35),     # drop 0.02: satisfies 0.03
                _child("c", 0.2, 0.85, 0.70, 0.45),     # drop 0.10: too much
                _child("d", 0.2, 0.84, 0.60, 0.40)]     # dominated by c (same δ, worse everywhere)
    out = frontier(children, RecommendRule(maximize="w2", max_clean_drop=0.03))
    flags = {p["job_id"]: p["pareto"] for p in out["points"]}
    assert flags == {"a": True, "b": True, "c": True, "d": False}
    assert out["pareto_objectives"] == ["clean", "w2", "linf", "delta"]
    rec = out["recommendation"]
    assert rec["job_id"] == "b" and rec["satisfied_by"] == ["a", "b"]
    assert rec["rule"] == {"maximize": "w2", "max_clean_drop": 0.03}
    # the candidates differ in δ: the ranking by robust accuracy at each one's own δ is said to lean small
    assert "measured at its own δ" in rec["caveat"] and rec["reason"].endswith(rec["caveat"])
    chosen = next(p for p in out["points"] if p["recommended"])
    assert chosen["job_id"] == "b" and chosen["clean_drop"] == pytest.approx(0.02)
    assert chosen["w2_robust_accuracy_ci95"] == pytest.approx([0.52, 0.58])


def test_a_larger_delta_is_not_dominated_by_a_higher_number_at_a_smaller_delta() -> None:
    children = [_child("small", 0.05, 0.94, 0.60, 0.40), _child("large", 0.5, 0.90, 0.30, 0.20)]
    flags = [p["pareto"] for p in frontier(children, RecommendRule())["points"]]
    assert flags == [True, True]
    same_delta = [_child("x", 0.1, 0.94, 0.60, 0.40), _child("y", 0.1, 0.90, 0.30, 0.20)]
    assert [p["pareto"] for p in frontier(same_delta, RecommendRule())["points"]] == [True, False]


def test_one_delta_or_a_non_robust_objective_needs_no_caveat() -> None:
    same_delta = [_child("x", 0.1, 0.94, 0.60, 0.40), _child("y", 0.1, 0.93, 0.50, 0.30)]
    assert "caveat" not in frontier(same_delta, RecommendRule())["recommendation"]
    deltas = [_child("a", 0.05, 0.94, 0.60, 0.40), _child("b", 0.1, 0.93, 0.50, 0.30)]
    assert "caveat" not in frontier(deltas, RecommendRule(maximize="delta"))["recommendation"]
    assert "caveat" in frontier(deltas, RecommendRule(maximize="linf"))["recommendation"]


def test_no_child_satisfies_the_rule_is_said() -> None:
    children = [_child("a", 0.1, 0.80, 0.5, 0.3), _child("b", 0.2, 0.70, 0.6, 0.4)]
    rec = frontier(children, RecommendRule(maximize="w2", max_clean_drop=0.03))["recommendation"]
    assert rec["job_id"] is None and "no child satisfies the rule" in rec["reason"] and "0.150" in rec["reason"]


def test_unfinished_children_are_points_without_numbers() -> None:
    children = [_child("a", 0.1, 0.94, 0.5, 0.3), _child("b", 0.2, 0.0, 0.0, 0.0, status="cancelled")]
    out = frontier(children, RecommendRule(max_clean_drop=None))
    b = out["points"][1]
    assert b["status"] == "cancelled" and not b["measured"] and not b["pareto"] and "clean_accuracy" not in b
    assert out["recommendation"]["job_id"] == "a"
    none = frontier([children[1]], RecommendRule())["recommendation"]
    assert none["job_id"] is None and "no child finished" in none["reason"]


def test_corruption_accuracy_is_read_when_the_report_has_it() -> None:
    children = [_child("a", 0.1, 0.94, 0.5, 0.3, corruption=0.7), _child("b", 0.2, 0.93, 0.6, 0.4, corruption=0.8)]
    out = frontier(children, RecommendRule(maximize="corruption"))
    first = out["points"][0]
    assert first["corruption_accuracy"] == 0.7 and first["corruption_accuracy_ci95"] == [0.69, 0.7]
    assert "corruption" in out["pareto_objectives"] and out["recommendation"]["job_id"] == "b"
    missing = frontier([_child("a", 0.1, 0.94, 0.5, 0.3)], RecommendRule(maximize="corruption"))["recommendation"]
    assert missing["job_id"] is None and "corruption evaluation" in missing["reason"]


def test_ties_go_to_the_higher_clean_accuracy_then_the_earlier_child() -> None:
    children = [_child("a", 0.1, 0.93, 0.5, 0.3), _child("b", 0.2, 0.94, 0.5, 0.3), _child("c", 0.3, 0.94, 0.5, 0.3)]
    assert frontier(children, RecommendRule())["recommendation"]["job_id"] == "b"
