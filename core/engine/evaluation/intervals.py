"""Uncertainty of accuracies: Wilson intervals for one accuracy, a paired bootstrap for a change.

For B2 (fine-tuning): the before/after numbers are measured on the same test images, so their
change is paired. `paired_change(before.correct, after.correct)` takes the per-image outcomes
(bool tensors, same images in the same order; e.g. `W2EnsembleResult.correct`) and gives the
change with a 95 % interval; `significant_improvement(change)` is the verdict `improved` uses.

Why Wilson: the normal ("Wald") interval collapses to a point at an accuracy of 0 or 1 and
under-covers near them, where robust accuracies often sit; Wilson's score interval keeps its
coverage close to 95 % there too (tests/core/test_evaluation.py simulates it).

Why the bootstrap resamples per-image outcomes, also for W2 (docs/concepts.md, "Intervals"):
a W2 attack couples the images through one shared budget, so an image's outcome depends on the
rest of the set. But it depends on it only through a few whole-set scalars (the normaliser
N = Υ and the projection factor ρ), which a resample of hundreds of images changes little. Re-running
the attack on every resample would capture that extra variation at 2,000 attacks' cost; the
measurement in docs/concepts.md (bench/eval_presets.py --bootstrap-check) shows it to be small
next to the sampling variation of the images, so the per-image bootstrap is used.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["accuracy_stat", "paired_change", "share", "significant_improvement", "wilson_interval"]

Z95 = 1.959963984540054   # the standard normal's 97.5 % quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion correct/n (n = 0: the whole [0, 1])."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct must lie in [0, n]; got {correct} of {n}")
    p = correct / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at 0 or n the bound is exactly 0 or 1 (the formula's rounding would leave ~1e-17)
    return (0.0 if correct == 0 else max(0.0, centre - half)), (1.0 if correct == n else min(1.0, centre + half))


def share(correct: torch.Tensor) -> float:
    """The share of True in a per-image outcome, computed exactly (count / n, not a float32 mean)."""
    n = int(correct.numel())
    return int(correct.sum()) / n if n else 0.0


def accuracy_stat(correct: torch.Tensor) -> dict[str, Any]:
    """{"accuracy", "n", "ci95": [lo, hi]} of per-image outcomes (a bool or 0/1 tensor)."""
    n = int(correct.numel())
    hits = int(correct.sum())
    lo, hi = wilson_interval(hits, n)
    return {"accuracy": hits / n if n else 0.0, "n": n, "ci95": [lo, hi]}


def paired_change(before_correct: torch.Tensor, after_correct: torch.Tensor, *, resamples: int = 2000,
                  seed: int = 0) -> dict[str, Any]:
    """after − before accuracy on the same images, with a paired percentile-bootstrap 95 % interval.

    Each resample draws n images with replacement and takes the same draw for both: the change
    on a resample is the mean of d_i = after_i − before_i over the draw. d_i takes only the values
    −1, 0, +1, so a resample is fully described by how many of each it drew: one multinomial draw
    per resample (exactly the image bootstrap, in O(resamples) instead of O(resamples·n))."""
    b = before_correct.reshape(-1).to("cpu", torch.int64)
    a = after_correct.reshape(-1).to("cpu", torch.int64)
    if b.shape != a.shape:
        raise ValueError(f"before and after must be outcomes on the same images; got {b.numel()} and {a.numel()}")
    n = int(b.numel())
    method = f"paired bootstrap over images ({resamples} resamples, percentile)"
    if n == 0:
        return {"change": 0.0, "ci95": [0.0, 0.0], "n": 0, "method": method}
    d = (a - b).numpy()
    counts = np.array([(d == -1).sum(), (d == 0).sum(), (d == 1).sum()], dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=resamples)
    changes = (draws[:, 2] - draws[:, 0]) / n
    lo, hi = np.quantile(changes, [0.025, 0.975])
    return {"change": float(d.mean()), "ci95": [float(lo), float(hi)], "n": n, "method": method}


def significant_improvement(change: dict[str, Any]) -> bool:
    """The change's 95 % interval lies above zero."""
    return float(change["ci95"][0]) > 0.0
