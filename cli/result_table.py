"""The before/after table that every command prints for a result, in plain words.

`robustify demo`, the local `robustify finetune` / `evaluate` and the client's `jobs submit
--watch` / `jobs get` all print a job's result (or the local report, which has the same
field names) through these functions, so a user sees the same thing everywhere: every robust
accuracy with its ball and radius, whether the fine-tune improved on the input, and any
warning. Pure Python: the HTTP client imports it without torch.
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


def finetune_table(result: dict[str, Any]) -> str:
    """A fine-tune's result (the job's `result` or report.json): test-set numbers before and after,
    the verdict, how the checkpoint was chosen, how it trained, and the warnings."""
    before, after = result.get("before") or {}, result.get("after") or {}
    n_test = before.get("n_examples")
    lines = [f"{'':24s}{'before':>9s}{'after':>9s}{'change':>9s}"]
    for label, key in _ROWS:
        if key not in before:
            continue
        b, a = before.get(key), after.get(key)
        change = f"{a - b:+9.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else f"{'-':>9s}"
        what = _what(key, before)
        lines.append(f"{label:24s}{_number(b):>9s}{_number(a):>9s}{change}" + (f"   {what}" if what else ""))
    if n_test:
        lines.append(f"(test set, {n_test} images)")
    selection = result.get("selection") or {}
    n_val = (result.get("provenance") or {}).get("examples", {}).get("validation")
    rule = (f"highest validation {selection.get('metric', 'robust accuracy')}"
            + (f" on {n_val} images" if n_val else "")
            + (f" with clean accuracy at most {selection['max_clean_drop']:g} below the input's"
               if selection.get("max_clean_drop") is not None else ""))
    if result.get("stopped"):
        lines.append(f"STOPPED after epoch {result.get('epochs_completed')}: the run was cancelled; "
                     f"the best checkpoint so far is epoch {result.get('best_epoch')}.")
    elif result.get("improved"):
        lines.append(f"IMPROVED: the best checkpoint is epoch {result.get('best_epoch')} of "
                     f"{result.get('epochs_completed')} ({rule}).")
    else:
        lines.append(f"NOT IMPROVED: no fine-tuned epoch beat the input model ({rule}); the best checkpoint is "
                     "the input model itself, unchanged.")
    config = result.get("config") or {}
    if config:
        lines.append(f"trained {config.get('epochs')} epochs, batch_size {config.get('batch_size')}, "
                     f"lr {config.get('lr')}, beta {config.get('beta')}, seed {config.get('seed')}, "
                     f"inner attack {attack_summary(config)}")
    lines += [f"warning: {w}" for w in result.get("warnings") or []]
    return "\n".join(lines)


def evaluation_table(summary: dict[str, Any], warnings: list[str] | None = None) -> str:
    """An evaluation's headline (the job's result.summary or report.json's summary)."""
    source = {"threat_model": "the threat model's radius",
              "largest_radius": "the largest radius evaluated; the threat model's is not among them"}
    lines = []
    for label, key in _ROWS:
        if key in summary:
            lines.append(f"{label:24s}{_number(summary[key]):>9s}   {_what(key, summary)}")
    delta = summary.get("delta")
    if isinstance(delta, (int, float)):
        lines.append(f"(headline at δ={delta:.4g}: {source.get(summary.get('delta_source'), 'as configured')}; "
                     f"{summary.get('n_examples', '?')} test images)")
    lines += [f"warning: {w}" for w in warnings or []]
    return "\n".join(lines)


def result_table(result: dict[str, Any]) -> str:
    """The table for a finished job's result, whichever recipe it ran."""
    if result.get("type") == "evaluate" or "summary" in result:
        return evaluation_table(result.get("summary") or {}, result.get("warnings"))
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
