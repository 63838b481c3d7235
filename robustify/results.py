"""A job's result (or its report.json) read as typed objects: every accuracy with its n and 95 %
interval, the evaluation preset, the per-attack rows, the masking audit, per-class numbers and a
fine-tune's verdict.

`job.outcome` (robustify.types.Job) and `Outcome.from_report(client.jobs.report(id))` build one.
The report grew these fields over time, so every one is optional: an older server's result gives
None or an empty list where it has nothing, never an error. An accuracy is read in either of the
two shapes the server writes: a block {"accuracy", "n", "ci95": [lo, hi]}, or a plain number
beside "<key>_ci95" and "<key>_n" (or the block's "n_examples").
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, model_validator

from robustify._base import ApiObject

ACCURACY_KEYS = ("clean_accuracy", "w2_robust_accuracy", "linf_robust_accuracy", "l2_robust_accuracy")

# A fine-tune's verdict in plain words (the server may send its own sentence; it wins).
VERDICT_WORDS = {
    "improved": "improved: the interval of the change lies above zero",
    "no_significant_change": "no significant change: the interval of the change includes zero",
    "worse": "worse: the interval of the change lies below zero",
    "improved_with_clean_drop": "more robust, but the clean accuracy fell by more than the allowed drop",
    "improved_with_class_collapse": "more robust, but the accuracy on a class collapsed",
    "improved_but_audit_failed": "more robust by the numbers, but the masking audit failed: the gain may be masking",
    "unchanged": "unchanged: no fine-tuned epoch beat the input model, which is handed back",
    "not_improved": "not improved: no fine-tuned epoch beat the input model",
    "stopped": "stopped: the run was cancelled before its test numbers",
}


class Accuracy(ApiObject):
    """One measured accuracy: the fraction, the images it is over and its 95 % interval."""

    accuracy: float | None = None
    n: int | None = None
    ci95: tuple[float, float] | None = None

    def __str__(self) -> str:
        if self.accuracy is None:
            return "—"
        interval = f" [{self.ci95[0]:.3f}, {self.ci95[1]:.3f}]" if self.ci95 else ""
        return f"{self.accuracy:.3f}{interval}" + (f" (n={self.n})" if self.n is not None else "")


def read_accuracy(block: Mapping[str, Any] | None, key: str) -> Accuracy | None:
    """`block[key]` as an Accuracy, in either shape (module docstring); None when absent."""
    if not isinstance(block, Mapping):
        return None
    value = block.get(key)
    if isinstance(value, Mapping):
        return Accuracy.model_validate(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    n = block.get(f"{key}_n", block.get("n", block.get("n_examples")))
    # an attack's row names its one accuracy "robust_accuracy" and puts "n" and "ci95" beside it
    ci95 = block.get(f"{key}_ci95", block.get("ci95") if key == "robust_accuracy" else None)
    return Accuracy(accuracy=float(value), n=n if isinstance(n, int) else None, ci95=ci95)


class _Accuracies(ApiObject):
    """A block of accuracies by key; `accuracy(key)` reads one with its interval."""

    def accuracy(self, key: str) -> Accuracy | None:
        return read_accuracy(self.model_dump(), key)

    @property
    def clean(self) -> Accuracy | None:
        return self.accuracy("clean_accuracy")

    @property
    def w2(self) -> Accuracy | None:
        return self.accuracy("w2_robust_accuracy")


class Measurements(_Accuracies):
    """A block of numbers (before, after, an evaluation's summary): `clean`, `w2`, `linf`, `l2`,
    or any key through `accuracy(key)`."""

    @property
    def linf(self) -> Accuracy | None:
        return self.accuracy("linf_robust_accuracy")

    @property
    def l2(self) -> Accuracy | None:
        return self.accuracy("l2_robust_accuracy")


class AuditCheck(ApiObject):
    """One check of the masking audit: pass, warn or fail, and a line saying why."""

    check: str = ""
    status: str = "pass"                      # pass | warn | fail
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "pass"


class AttackRun(ApiObject):
    """One attack of the evaluation: what it was, how long it ran, whether it converged, its number."""

    attack: str | None = None
    loss: str | None = None
    restart: int | None = None
    delta: float | None = None
    steps: int | None = None
    converged: bool | None = None
    robust_accuracy: Accuracy | None = None

    @model_validator(mode="before")
    @classmethod
    def _accuracy_in_either_shape(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and not isinstance(data.get("robust_accuracy"), Mapping):
            data = {**data, "robust_accuracy": read_accuracy(data, "robust_accuracy")}
        return data


class ClassNumbers(_Accuracies):
    """One class of the test split: its label, name and images, and its accuracies by key
    ("clean_accuracy", "w2_robust_accuracy", ...), each with its interval."""

    label: int | None = Field(default=None, validation_alias="class")
    name: str | None = None
    n: int | None = None


class Change(ApiObject):
    """A fine-tune's before → after change in one metric, with its paired 95 % interval."""

    metric: str | None = None
    change: float | None = None
    ci95: tuple[float, float] | None = None
    n: int | None = None
    method: str | None = None

    @property
    def significant(self) -> bool | None:
        """True when the interval lies above zero, False when it does not; None without one."""
        return None if self.ci95 is None else self.ci95[0] > 0


def _per_class_rows(value: Any) -> list[Any]:
    """Per-class rows, from a list of rows or from {"before": rows, "after": rows} (the `after` ones)."""
    if isinstance(value, Mapping):
        value = value.get("after", value.get("test"))
    return [row for row in value if isinstance(row, Mapping)] if isinstance(value, list) else []


def _changes(value: Any, intervals: Any) -> dict[str, Change]:
    """metric -> number (with its interval in `intervals`, metric -> [lo, hi]) or -> a block
    {"change", "ci95", ...}; or one such block for one metric."""
    if not isinstance(value, Mapping):
        return {}
    if "change" in value and not isinstance(value["change"], Mapping):
        return {str(value.get("metric", "")): Change.model_validate(value)}
    intervals = intervals if isinstance(intervals, Mapping) else {}
    out = {}
    for metric, v in value.items():
        if isinstance(v, Mapping):
            out[metric] = Change.model_validate({"metric": metric, **v})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[metric] = Change(metric=metric, change=float(v), ci95=intervals.get(metric))
    return out


class Outcome(ApiObject):
    """What a finished job found, typed (module docstring)."""

    type: str | None = None
    improved: bool | None = None
    verdict: str | None = None
    verdict_text: str | None = None
    evaluation: str | None = None             # the preset every number was measured with
    summary: Measurements | None = None       # an evaluation's headline numbers
    before: Measurements | None = None        # a fine-tune's input model, on the test split
    after: Measurements | None = None         # its chosen checkpoint, on the test split
    changes: dict[str, Change] = Field(default_factory=dict)   # metric -> before → after, paired interval
    basis: Change | None = None               # the change that decided the verdict
    attacks: list[AttackRun] = Field(default_factory=list)
    audit: list[AuditCheck] = Field(default_factory=list)
    per_class: list[ClassNumbers] = Field(default_factory=list)
    confusion_matrix: list[list[int]] | None = None
    warnings: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _from_result(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        provenance = data.get("provenance") if isinstance(data.get("provenance"), Mapping) else {}
        config = data.get("config") if isinstance(data.get("config"), Mapping) else {}
        summary = data.get("summary") if isinstance(data.get("summary"), Mapping) else {}
        data.setdefault("evaluation",
                        provenance.get("evaluation") or config.get("evaluation") or summary.get("evaluation"))
        if isinstance(data.get("evaluation"), Mapping):          # {"preset": ..., ...}
            data["evaluation"] = data["evaluation"].get("preset")
        data["changes"] = _changes(data.pop("change", None), data.get("change_ci95"))
        basis = data.get("verdict_basis")
        data["basis"] = basis if isinstance(basis, Mapping) else None
        # a fine-tune keeps them with its test numbers (the checkpoint's: `after`); an evaluation at the top
        after = data.get("after") if isinstance(data.get("after"), Mapping) else {}
        data["per_class"] = _per_class_rows(data.get("per_class") or after.get("per_class"))
        data.setdefault("confusion_matrix", after.get("confusion_matrix"))
        attacks = data.get("attacks") or _attack_rows(data.get("w2"))
        data["attacks"] = attacks if isinstance(attacks, list) else []
        for key in ("audit", "warnings"):
            if not isinstance(data.get(key), list):
                data[key] = []
        return data

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> Outcome:
        """The same view of a job's report.json (`client.jobs.report(id)`), which adds the
        per-radius attack rows to what the job's result holds."""
        return cls.model_validate(report)

    @property
    def verdict_words(self) -> str | None:
        """The verdict in plain words ("no significant change: ..."); None for an evaluation."""
        if self.verdict_text:
            return self.verdict_text
        if self.verdict:
            return VERDICT_WORDS.get(self.verdict, self.verdict.replace("_", " "))
        if self.improved is not None:
            return VERDICT_WORDS["improved" if self.improved else "not_improved"]
        return None

    @property
    def audit_status(self) -> str | None:
        """The worst status of the audit's checks (fail > warn > pass); None without an audit."""
        statuses = {c.status for c in self.audit}
        worst = next((s for s in ("fail", "warn", "pass") if s in statuses), None)
        # an evaluation job's result keeps only the status, in its summary (the checks are in its report)
        told = (self.summary.model_extra or {}).get("audit") if self.summary is not None else None
        return worst or (told if isinstance(told, str) else None)

    @property
    def numbers(self) -> Measurements | None:
        """The numbers a reader looks at first: a fine-tune's `after`, an evaluation's `summary`."""
        return self.after or self.summary


def _attack_rows(w2: Any) -> list[Any]:
    """An evaluation report's W2 rows, one per radius (and per attack when the ensemble lists them)."""
    rows: list[Any] = []
    for row in w2 if isinstance(w2, list) else []:
        if not isinstance(row, Mapping):
            continue
        inner = row.get("attacks")
        if isinstance(inner, list):
            rows += [{"delta": row.get("delta"), **a} for a in inner if isinstance(a, Mapping)]
        else:
            rows.append({"attack": row.get("attack", "w-pgd"), **row})
    return rows
