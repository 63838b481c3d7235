"""Per-class accuracies and the confusion matrix: a mean over the test set can hide a class the
model gave up on (a fine-tune on two classes of ten once scored 0.97 on those and 0 on the rest).

For B2 (fine-tuning): `per_class(y, {"clean_accuracy": clean_correct, "w2_robust_accuracy": ...},
num_classes)` before and after, then `collapsed_classes(before_rows, after_rows, threshold)` lists
the classes whose clean accuracy fell by more than `threshold`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from core.engine.evaluation.intervals import wilson_interval

__all__ = ["collapsed_classes", "confusion_matrix", "per_class"]


def per_class(y: torch.Tensor, outcomes: Mapping[str, torch.Tensor], num_classes: int,
              class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per class: its label (and name), n, and for every per-image outcome given (e.g.
    "clean_accuracy", "w2_robust_accuracy") the class's accuracy and its 95 % Wilson interval
    under "<key>_ci95". A class absent from the sample has n = 0 and null accuracies."""
    labels = y.reshape(-1).to("cpu")
    flat = {k: v.reshape(-1).to("cpu") for k, v in outcomes.items()}
    rows: list[dict[str, Any]] = []
    for c in range(num_classes):
        mask = labels == c
        n = int(mask.sum())
        row: dict[str, Any] = {"class": c, "n": n}
        if class_names is not None and c < len(class_names):
            row["name"] = class_names[c]
        for key, correct in flat.items():
            hits = int(correct[mask].sum())
            row[key] = hits / n if n else None
            row[f"{key}_ci95"] = list(wilson_interval(hits, n)) if n else None
        rows.append(row)
    return rows


def confusion_matrix(y: torch.Tensor, pred: torch.Tensor, num_classes: int) -> list[list[int]]:
    """counts[true class][predicted class]."""
    pairs = y.reshape(-1).to("cpu", torch.int64) * num_classes + pred.reshape(-1).to("cpu", torch.int64)
    counts = torch.bincount(pairs, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).tolist()


def collapsed_classes(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], threshold: float,
                      key: str = "clean_accuracy") -> list[dict[str, Any]]:
    """The classes whose `key` accuracy fell by more than `threshold` from `before` to `after`
    (rows of per_class on the same images), with both numbers and n."""
    out = []
    for b, a in zip(before, after, strict=True):   # the same classes, in order
        if b.get(key) is None or a.get(key) is None:
            continue
        if b[key] - a[key] > threshold:
            out.append({"class": b["class"], **({"name": b["name"]} if "name" in b else {}), "n": b["n"],
                        "before": b[key], "after": a[key], "drop": b[key] - a[key]})
    return out
