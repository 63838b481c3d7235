"""The before/after table that every command prints for a result, in plain words.

`robustify demo`, the local `robustify finetune` / `evaluate` and the client's `jobs submit
--watch` / `jobs get` all print a job's result (or the local report, which has the same
field names) through these functions, so a user sees the same thing everywhere: every robust
accuracy with its ball and radius, its 95 % interval and the evaluation preset that measured it,
the attacks behind the W2 number (steps, converged), the masking audit, the verdict of a fine-tune
(decided by the paired interval of the change), and any warning. Pure Python: the HTTP client
imports it without torch.
"""
from __future__ import annotations

import math
from typing import Any

_ROWS = (("clean accuracy", "clean_accuracy"), ("W2 robust accuracy", "w2_robust_accuracy"),
         ("l-inf robust accuracy", "linf_robust_accuracy"), ("l2 robust accuracy", "l2_robust_accuracy"))
_GROUND = {"linf": "l-inf", "l2": "l2"}


def _what(key: str, m: dict[str, Any]) -> str:
    """What a metric measured, e.g. "W2 ball, l-inf cost, δ=0.1"."""
    delta = m.get("delta")
    radius = f"δ={delta:.4g}" if isinstance(delta, (int, float)) else "δ unknown"
    if key == "w2_robust_accuracy":
        ground = str(m.get("w2_threat", "w2-linf")).removeprefix("w2-")
        return f"W2 ball, {_GROUND.get(ground, ground)} cost, {radius}"
    if key in ("linf_robust_accuracy", "l2_robust_accuracy"):
        ground = key.split("_")[0]
        attack = m.get(f"{ground}_attack")
        return f"{_GROUND[ground]} ball, {radius}" + (f" ({attack})" if attack else "")
    return ""


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not math.isnan(value) else "-"


def _interval(ci: Any, signed: bool = False) -> str:
    """A 95 % interval as "[0.381, 0.478]" ("" when there is none)."""
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci)):
        return ""
    spec = "+.3f" if signed else ".3f"
    return f"[{ci[0]:{spec}}, {ci[1]:{spec}}]"


def _with_interval(value: Any, ci: Any, signed: bool = False) -> str:
    number = (f"{value:+.3f}" if signed else _number(value)) if isinstance(value, (int, float)) else "-"
    interval = _interval(ci, signed)
    return f"{number} {interval}" if interval else number


_PRESET_WORDS = {"standard": "every attack of the ensemble run until it stopped improving",
                 "quick": "cheaper attacks, a first look rather than a final number"}


def _preset_line(preset: Any) -> str | None:
    return f"evaluation preset: {preset}: {_PRESET_WORDS.get(str(preset), 'as configured')}" if preset else None


def attack_rows(w2_row: dict[str, Any], indent: str = "  ") -> list[str]:
    """One line per attack and member behind a W2 number: its accuracy, interval, steps and whether it
    converged; the minimising one is marked."""
    lines = []
    best = w2_row.get("attack")
    for a in (w2_row.get("attacks") or []) + (w2_row.get("members") or []):
        if a.get("kind") == "member":
            how = "pointwise set inside the W2 ball"
        else:
            how = (f"{a.get('steps')} steps, " + ("converged" if a.get("converged") else "NOT converged (step cap)"))
        mark = "  <- minimum" if a.get("attack") == best else ""
        lines.append(f"{indent}{a.get('attack', '?'):34s}{_with_interval(a.get('robust_accuracy'), a.get('ci95')):>24s}"
                     f"   {how}{mark}")
    return lines


def audit_lines(audit: Any) -> list[str]:
    """The masking audit, one line per check."""
    if not audit:
        return []
    return ["masking audit:"] + [f"  {c.get('status', '?'):5s} {c.get('check', '?')}: {c.get('detail', '')}"
                                 for c in audit if isinstance(c, dict)]


def _verdict_line(result: dict[str, Any], rule: str) -> str:
    """The verdict in plain words: "IMPROVED: the best checkpoint is epoch N of M" only for an
    unqualified improvement whose paired interval lies above zero."""
    name = result.get("verdict")
    text = result.get("verdict_text") or ""
    if result.get("stopped") or name == "stopped":
        return (f"STOPPED after epoch {result.get('epochs_completed')}: the run was cancelled; "
                f"the best checkpoint so far is epoch {result.get('best_epoch')}.")
    if name == "unchanged" or (name is None and not result.get("improved")):
        return (f"NOT IMPROVED: no fine-tuned epoch beat the input model ({rule}); the best checkpoint is "
                "the input model itself, unchanged.")
    if result.get("improved"):
        return (f"IMPROVED: the best checkpoint is epoch {result.get('best_epoch')} of "
                f"{result.get('epochs_completed')} ({rule})" + (f"; {text}." if text else "."))
    label = {"no_significant_change": "NO SIGNIFICANT CHANGE", "worse": "WORSE"}.get(
        str(name), str(name).upper().replace("_", " "))
    return f"{label}: {text} (the checkpoint handed back is epoch {result.get('best_epoch')}: {rule})."


def finetune_table(result: dict[str, Any]) -> str:
    """A fine-tune's result (the job's `result` or report.json): test-set numbers before and after
    with their 95 % intervals, the paired change, the verdict, the attacks behind the W2 number,
    the masking audit, how the checkpoint was chosen, how it trained, and the warnings."""
    before, after = result.get("before") or {}, result.get("after") or {}
    change_ci = result.get("change_ci95") or {}
    n_test = before.get("n_examples")
    lines = [f"{'':24s}{'before':>23s}{'after':>23s}{'change':>26s}"]
    for label, key in _ROWS:
        if key not in before:
            continue
        b, a = before.get(key), after.get(key)
        diff = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        what = _what(key, before)
        lines.append(f"{label:24s}{_with_interval(b, before.get(key + '_ci95')):>23s}"
                     f"{_with_interval(a, after.get(key + '_ci95')):>23s}"
                     f"{_with_interval(diff, change_ci.get(key), signed=True):>26s}" + (f"   {what}" if what else ""))
    if n_test:
        lines.append(f"(test set, {n_test} images; 95 % intervals: Wilson for each accuracy, a paired bootstrap "
                     "over the images for the change)")
    preset = _preset_line(result.get("evaluation") or before.get("evaluation"))
    if preset:
        lines.append(preset)
    selection = result.get("selection") or {}
    n_val = (result.get("provenance") or {}).get("examples", {}).get("validation")
    rule = (f"highest validation {selection.get('metric', 'robust accuracy')}"
            + (f" on {n_val} images" if n_val else "")
            + (f" with clean accuracy at most {selection['max_clean_drop']:g} below the input's"
               if selection.get("max_clean_drop") is not None else ""))
    lines.append(_verdict_line(result, rule))
    w2_after = after.get("w2") if isinstance(after.get("w2"), dict) else None
    if w2_after:
        lines.append("W2 attacks (after):")
        lines += attack_rows(w2_after)
    lines += audit_lines(result.get("audit"))
    config = result.get("config") or {}
    if config:
        lines.append(f"{_trained(result, config)}, batch_size {config.get('batch_size')}, "
                     f"lr {config.get('lr')}, beta {config.get('beta')}, seed {config.get('seed')}, "
                     f"inner attack {attack_summary(config)}")
    lines += [f"warning: {w}" for w in result.get("warnings") or []]
    return "\n".join(lines)


def _trained(result: dict[str, Any], config: dict[str, Any]) -> str:
    """How many epochs ran: "trained 8 epochs", or "trained 1 of 4 epochs" for a run that stopped early
    (a cancel): the epochs completed, never just the configured count."""
    planned, done = config.get("epochs"), result.get("epochs_completed")
    if isinstance(done, int) and (done != planned or result.get("stopped")):
        return f"trained {done} of {planned} epoch{'s' if planned != 1 else ''}"
    return f"trained {planned} epoch{'s' if planned != 1 else ''}"


def evaluation_table(summary: dict[str, Any], warnings: list[str] | None = None,
                     details: dict[str, Any] | None = None) -> str:
    """An evaluation's headline (the job's result.summary or report.json's summary), each number with
    its 95 % interval and the preset; with `details` (report.json, or a job result that carries
    them) also the attacks behind the headline W2 number and the masking audit."""
    source: dict[str | None, str] = {
        "threat_model": "the threat model's radius",
        "largest_radius": "the largest radius evaluated; the threat model's is not among them"}
    lines = []
    for label, key in _ROWS:
        if key in summary:
            lines.append(f"{label:24s}{_with_interval(summary[key], summary.get(key + '_ci95')):>24s}"
                         f"   {_what(key, summary)}")
    delta = summary.get("delta")
    if isinstance(delta, (int, float)):
        lines.append(f"(headline at δ={delta:.4g}: {source.get(summary.get('delta_source'), 'as configured')}; "
                     f"{summary.get('n_examples', '?')} test images; 95 % Wilson intervals)")
    preset = _preset_line(summary.get("evaluation"))
    if preset:
        lines.append(preset)
    details = details or {}
    head = next((r for r in details.get("w2") or [] if isinstance(delta, (int, float))
                 and abs(r.get("delta", -1) - delta) <= 1e-12 * max(1.0, delta)), None)
    if head:
        lines.append("W2 attacks:")
        lines += attack_rows(head)
    if details.get("audit"):
        lines += audit_lines(details["audit"])
    elif summary.get("audit"):
        lines.append(f"masking audit: {summary['audit']} (report.json lists the checks)")
    lines += [f"warning: {w}" for w in warnings or []]
    return "\n".join(lines)


def result_table(result: dict[str, Any]) -> str:
    """The table for a finished job's result, whichever recipe it ran."""
    if result.get("type") == "evaluate" or "summary" in result:
        return evaluation_table(result.get("summary") or {}, result.get("warnings"), result)
    return finetune_table(result)


def attack_summary(config: dict[str, Any]) -> str:
    """The fine-tune's inner attack in a few words: "W-PGD K=10", "memory, 1 step", "allocate γ=1.5"."""
    steps = int(config.get("attack_steps") or 0)
    schedule = config.get("attack_schedule", "standard")
    if schedule == "allocate":
        extra = f" + {steps - 1} W-PGD step{'s' if steps > 2 else ''}" if steps > 1 else ""
        return f"allocate γ={config.get('attack_overshoot')}{extra}"
    if schedule == "memory":
        return f"memory, {steps} step{'s' if steps != 1 else ''}"
    return f"W-PGD K={steps}"
