"""A sweep's outcome: the accuracy–robustness frontier of its fine-tunes and the one a rule recommends.

A sweep (worker/sweepjob.py) fine-tunes one model once per value of δ (and of β or the attack
schedule). Each child reports its returned model's numbers on the test split (`after`, with a 95 %
interval for every accuracy) and the input model's (`before`). This module turns those results into

    one point per child: clean, W2, pointwise (l∞ or l2) and, when the report has it, mean
    corruption accuracy, each with its interval, and the clean drop against the input model
    → the Pareto-optimal points: no other point is at least as good on every objective and better on
      one. The objectives are the clean and robust accuracies and, when the children's δ differ, δ
      itself (a robust accuracy at a larger radius is a stronger guarantee, so a point at a larger δ
      is never dominated by one at a smaller δ)
    → the recommendation: among the children that satisfy the user's rule (clean accuracy dropped
      by at most `max_clean_drop` from the input's on the test split), the one with the highest
      `maximize`; ties go to the higher clean accuracy, then to the earlier child. None satisfies
      it: no recommendation, and the result says why.

It imports no torch: the API validates the rule with it, and the service computes the frontier
from the children's stored results.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.limits import MAX_BETA, MAX_RADIUS, MAX_SWEEP_CHILDREN

Objective = Literal["w2", "linf", "l2", "clean", "corruption", "delta"]
Schedule = Literal["standard", "memory", "allocate"]

# objective → the accuracy key of a child's before/after numbers (δ is the child's own radius)
_ACCURACY_KEY: dict[str, str] = {"w2": "w2_robust_accuracy", "linf": "linf_robust_accuracy",
                                 "l2": "l2_robust_accuracy", "clean": "clean_accuracy",
                                 "corruption": "corruption_accuracy"}
DEFAULT_MAX_CLEAN_DROP = 0.03


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _distinct(values: Sequence[Any] | None, what: str) -> None:
    if values is None:
        return
    if not values:
        raise ValueError(f"{what} is an empty list: give at least one value, or leave it out")
    seen: set[Any] = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{what} lists {v!r} twice: each value is one fine-tune, give it once")
        seen.add(v)


class SweepSpec(_Strict):
    """The values a sweep fine-tunes with: one child per combination of the lists given (a list
    left out keeps the recipe's value). At most MAX_SWEEP_CHILDREN children in all."""

    delta: list[float] | None = Field(default=None, description="Radii δ, each > 0 (the threat_model's kind).")
    beta: list[float] | None = Field(default=None, description="TRADES weights β, each >= 0.")
    attack_schedule: list[Schedule] | None = Field(default=None, description="Attack schedules of the training.")

    @field_validator("delta")
    @classmethod
    def _radii(cls, values: list[float] | None) -> list[float] | None:
        _distinct(values, "sweep.delta")
        for v in values or []:
            if not 0.0 < v <= MAX_RADIUS:
                raise ValueError(f"sweep.delta value {v} is out of range: each δ must be > 0 and <= {MAX_RADIUS:g} "
                                 "(a radius of 0 trains against nothing; the input model is the δ = 0 reference)")
        return values

    @field_validator("beta")
    @classmethod
    def _betas(cls, values: list[float] | None) -> list[float] | None:
        _distinct(values, "sweep.beta")
        for v in values or []:
            if not 0.0 <= v <= MAX_BETA:
                raise ValueError(f"sweep.beta value {v} is out of range: each β must be >= 0 and <= {MAX_BETA:g}")
        return values

    @field_validator("attack_schedule")
    @classmethod
    def _schedules(cls, values: list[Schedule] | None) -> list[Schedule] | None:
        _distinct(values, "sweep.attack_schedule")
        return values

    @model_validator(mode="after")
    def _size(self) -> SweepSpec:
        axes = self.axes()
        if not axes:
            raise ValueError("a sweep needs values to sweep: give sweep.delta (and optionally sweep.beta or "
                             "sweep.attack_schedule), e.g. {\"delta\": [0.05, 0.1, 0.2]}")
        count = 1
        for values in axes.values():
            count *= len(values)
        if count > MAX_SWEEP_CHILDREN:
            raise ValueError(f"this sweep makes {count} fine-tunes (the product of its lists' lengths); the limit is "
                             f"{MAX_SWEEP_CHILDREN}: give fewer values")
        return self

    def axes(self) -> dict[str, list[Any]]:
        """The swept fields with their values, in a fixed order (delta, beta, attack_schedule)."""
        return {name: list(v) for name in ("delta", "beta", "attack_schedule")
                if (v := getattr(self, name)) is not None}

    def points(self) -> list[dict[str, Any]]:
        """One dict per child: the swept fields' values, the first axis varying slowest."""
        combos: list[dict[str, Any]] = [{}]
        for name, values in self.axes().items():
            combos = [{**c, name: v} for c in combos for v in values]
        return combos


class RecommendRule(_Strict):
    """How the sweep picks one child: the highest `maximize` among the children whose clean accuracy
    fell by at most `max_clean_drop` (absolute, on the test split) from the input model's."""

    maximize: Objective = Field(default="w2", description="w2, linf or l2 robust accuracy (at the child's δ), "
                                                          "clean accuracy, mean corruption accuracy, or δ itself.")
    max_clean_drop: float | None = Field(default=DEFAULT_MAX_CLEAN_DROP, ge=0.0, le=1.0,
                                         description="Largest allowed drop of clean accuracy; null: no limit.")

    def describe(self) -> str:
        what = "δ" if self.maximize == "delta" else f"{_ACCURACY_KEY[self.maximize]}"
        limit = ("with no limit on the clean accuracy" if self.max_clean_drop is None else
                 f"whose clean accuracy dropped by at most {self.max_clean_drop:g} from the input model's")
        return f"the child with the highest {what} {limit}"


def check_rule_measured(rule: RecommendRule, threat_kind: str) -> str | None:
    """Why `rule` cannot be decided under a threat of `threat_kind` (None: it can)."""
    ground = "linf" if threat_kind.endswith("linf") else "l2"
    if rule.maximize in ("linf", "l2") and rule.maximize != ground:
        return (f"recommend.maximize {rule.maximize!r} is not measured under a {threat_kind} threat; "
                f"use w2, {ground}, clean, corruption or delta")
    return None


# ------------------------------------------------------------------------------------ the points
def _corruption(numbers: Mapping[str, Any]) -> tuple[float | None, list[float] | None]:
    """Mean corruption accuracy and its interval, where a child's numbers carry a corruption
    evaluation (core/engine/evaluation/corruptions.py): the one place that reads it."""
    if isinstance(numbers.get("corruption_accuracy"), (int, float)):
        return float(numbers["corruption_accuracy"]), numbers.get("corruption_accuracy_ci95")
    block = numbers.get("corruptions")
    if isinstance(block, Mapping):
        for key in ("mean_accuracy", "mean_corruption_accuracy", "accuracy"):
            if isinstance(block.get(key), (int, float)):
                return float(block[key]), block.get(f"{key}_ci95") or block.get("ci95")
    return None, None


def _numbers(numbers: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not numbers:
        return out
    for key in ("clean_accuracy", "w2_robust_accuracy", "linf_robust_accuracy", "l2_robust_accuracy"):
        if isinstance(numbers.get(key), (int, float)):
            out[key], out[f"{key}_ci95"] = float(numbers[key]), numbers.get(f"{key}_ci95")
    corruption, interval = _corruption(numbers)
    if corruption is not None:
        out["corruption_accuracy"], out["corruption_accuracy_ci95"] = corruption, interval
    return out


def frontier_point(child: Mapping[str, Any]) -> dict[str, Any]:
    """One child as a frontier point. `child`: {"job_id", "status", "values" (its swept fields),
    "delta", "result" (the fine-tune's result, or None)}."""
    result = child.get("result") or {}
    after, before = _numbers(result.get("after")), _numbers(result.get("before"))
    point: dict[str, Any] = {
        "job_id": child["job_id"], "status": child["status"], **dict(child.get("values") or {}),
        "delta": child["delta"], **after, "before": before or None,
        "clean_drop": (before["clean_accuracy"] - after["clean_accuracy"]
                       if "clean_accuracy" in before and "clean_accuracy" in after else None),
        "improved": result.get("improved"), "verdict": result.get("verdict"),
        "model_id": result.get("model_id"), "best_checkpoint_id": result.get("best_checkpoint_id"),
        "best_epoch": result.get("best_epoch"), "measured": child["status"] == "succeeded" and bool(after),
    }
    return point


def _value(point: Mapping[str, Any], objective: str) -> float | None:
    value = point.get("delta") if objective == "delta" else point.get(_ACCURACY_KEY[objective])
    return float(value) if isinstance(value, (int, float)) else None


def objectives(points: Sequence[Mapping[str, Any]]) -> list[str]:
    """What the Pareto front maximises: every accuracy all measured points have, and δ when they differ."""
    measured = [p for p in points if p["measured"]]
    if not measured:
        return []
    names = [o for o in ("clean", "w2", "linf", "l2", "corruption")
             if all(_value(p, o) is not None for p in measured)]
    if len({p["delta"] for p in measured}) > 1:
        names.append("delta")
    return names


def pareto(points: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[bool]:
    """For each point: measured and dominated by no other measured point on `names`."""
    def vec(p: Mapping[str, Any]) -> list[float]:
        return [_value(p, n) or 0.0 for n in names]

    flags = []
    for i, p in enumerate(points):
        if not p["measured"]:
            flags.append(False)
            continue
        mine = vec(p)
        dominated = any(
            q["measured"] and j != i and all(a >= b for a, b in zip(vec(q), mine, strict=True))
            and any(a > b for a, b in zip(vec(q), mine, strict=True))
            for j, q in enumerate(points))
        flags.append(not dominated)
    return flags


def satisfies(point: Mapping[str, Any], rule: RecommendRule) -> bool:
    if not point["measured"] or _value(point, rule.maximize) is None:
        return False
    if rule.max_clean_drop is None:
        return True
    drop = point.get("clean_drop")
    return drop is not None and drop <= rule.max_clean_drop + 1e-12


def recommend(points: Sequence[Mapping[str, Any]], rule: RecommendRule) -> dict[str, Any]:
    """The rule, the chosen child (or None) and, in words, why."""
    fits = [(i, p) for i, p in enumerate(points) if satisfies(p, rule)]
    record: dict[str, Any] = {"rule": rule.model_dump(mode="json"), "rule_text": rule.describe(),
                              "job_id": None, "satisfied_by": [p["job_id"] for _, p in fits]}
    if not fits:
        measured = sum(1 for p in points if p["measured"])
        if not measured:
            record["reason"] = "no child finished with numbers: nothing to recommend."
        elif rule.maximize == "corruption" and not any(_value(p, "corruption") is not None for p in points):
            record["reason"] = "no child's report has a corruption evaluation: nothing to maximise."
        else:
            drops = [p["clean_drop"] for p in points if p.get("clean_drop") is not None]
            limit = rule.max_clean_drop if rule.max_clean_drop is not None else 1.0
            least = f" (the smallest drop was {min(drops):.3f})" if drops else ""
            record["reason"] = (f"no child satisfies the rule: every measured child's clean accuracy dropped by more "
                                f"than {limit:g} from the input model's{least}; allow a larger "
                                "max_clean_drop or sweep smaller values.")
        return record
    _, best = max(fits, key=lambda ip: (_value(ip[1], rule.maximize) or 0.0,
                                             _value(ip[1], "clean") or 0.0, -ip[0]))
    record["job_id"] = best["job_id"]
    record["reason"] = (f"{best['job_id']} is {rule.describe()}: {rule.maximize} "
                        f"{_value(best, rule.maximize):.4g}, clean accuracy {_value(best, 'clean') or 0.0:.4g}"
                        + (f" (dropped {best['clean_drop']:.3f})" if best.get("clean_drop") is not None else "")
                        + f"; {len(fits)} of {len(points)} children satisfy the rule.")
    caveat = _own_delta_caveat(fits, rule)
    if caveat:
        record["caveat"] = caveat
        record["reason"] += f" Note: {caveat}"
    return record


def _own_delta_caveat(fits: Sequence[tuple[int, Mapping[str, Any]]], rule: RecommendRule) -> str | None:
    """Why a robust accuracy compared across children of different δ is no like-for-like ranking
    (None when the candidates share one δ, or the rule maximises no robust accuracy)."""
    if rule.maximize not in ("w2", "linf", "l2") or len({p["delta"] for _, p in fits}) < 2:
        return None
    return (f"each child's {rule.maximize} robust accuracy is measured at its own δ, and a smaller ball is "
            "easier to withstand, so this rule leans towards the smallest δ. To compare the children at "
            "the radius you expect to face, evaluate the Pareto children at that one δ (an evaluate job "
            "of each promoted model), or sweep β or the schedule at one δ.")


def frontier(children: Sequence[Mapping[str, Any]], rule: RecommendRule) -> dict[str, Any]:
    """The sweep's result: its points (each marked `pareto`, `satisfies_rule`, `recommended`), the
    objectives of the Pareto front and the recommendation."""
    points = [frontier_point(c) for c in children]
    names = objectives(points)
    front = pareto(points, names)
    choice = recommend(points, rule)
    for p, on_front in zip(points, front, strict=True):
        p["pareto"] = on_front
        p["satisfies_rule"] = satisfies(p, rule)
        p["recommended"] = p["job_id"] == choice["job_id"]
    return {"points": points, "pareto_objectives": names, "recommendation": choice}
