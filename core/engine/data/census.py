"""The data set census: images per class in each split, and warnings when a split cannot
represent the task (numpy only, so the API can answer it at upload without torch).

A robust accuracy is an average over the test images, and a fine-tune learns from the training
images: a class absent from the test split is never measured, a class absent from the training
split is never learnt, and a class with a tenth of another's images weighs a tenth as much in
both. The census says so when the data set is uploaded, before a job spends hours on it.

The rules (one place, used by the API, the CLI and the dashboard):
- `class_missing`: a class 0..K-1 has no image in a split;
- `class_imbalance`: within a split, the largest class has more than IMBALANCE_RATIO (10) times
  the images of the smallest class present (missing classes are reported by the rule above).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.engine.data.npz import stratified_split
from core.engine.data.sampling import class_counts

IMBALANCE_RATIO = 10.0
IMBALANCE_RULE = f"largest class / smallest class > {IMBALANCE_RATIO:g} within a split"

# The built-in data sets' counts per class (label order), train then test, as the engine loads
# them: digits is scikit-learn's 1,797 images split by core.engine.data.npz.stratified_split
# (test_fraction 0.2, seed 0); the others are the published splits. tests/core/test_census.py
# recounts digits and Fashion-MNIST from the data.
BUILTIN_CLASS_COUNTS: dict[str, dict[str, list[int]]] = {
    "digits": {"train": [142, 146, 142, 146, 145, 146, 145, 143, 139, 144],
               "test": [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]},
    "fashion-mnist": {"train": [6000] * 10, "test": [1000] * 10},
    "cifar10": {"train": [5000] * 10, "test": [1000] * 10},
    "cifar100": {"train": [500] * 100, "test": [100] * 100},
}


def split_counts(y: np.ndarray, y_test: np.ndarray | None, num_classes: int, *,
                 test_fraction: float = 0.2, seed: int = 0) -> dict[str, list[int]]:
    """Counts per class of the train and test splits the engine will use: the stored split when
    there is one (`y_test`), else the per-class split that core.engine.data.datasets.load_npz
    makes (same `test_fraction` and `seed`, so the census counts the images a job sees)."""
    if y_test is None:
        train_idx, test_idx = stratified_split(y, test_fraction=test_fraction, seed=seed)
        y, y_test = y[train_idx], y[test_idx]
    return {"train": class_counts(y, num_classes), "test": class_counts(y_test, num_classes)}


def _name(label: int, class_names: Sequence[str] | None) -> str:
    return f"{label} ({class_names[label]})" if class_names and label < len(class_names) else str(label)


def census_warnings(counts: Mapping[str, Sequence[int]],
                    class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One warning per split and rule: {"code", "split", "classes", "message"}."""
    warnings: list[dict[str, Any]] = []
    for split, per_class in counts.items():
        missing = [k for k, n in enumerate(per_class) if n == 0]
        if missing:
            names = ", ".join(_name(k, class_names) for k in missing)
            consequence = "is never measured" if split == "test" else "is never learnt"
            warnings.append({"code": "class_missing", "split": split, "classes": missing,
                             "message": f"the {split} split has no image of class {names}: it {consequence}."})
        present = [(n, k) for k, n in enumerate(per_class) if n > 0]
        if len(present) >= 2:
            (smallest, k_min), (largest, k_max) = min(present), max(present)
            if largest > IMBALANCE_RATIO * smallest:
                warnings.append({
                    "code": "class_imbalance", "split": split, "classes": [k_min, k_max],
                    "message": f"the {split} split is badly imbalanced: class {_name(k_max, class_names)} has "
                               f"{largest} images, class {_name(k_min, class_names)} {smallest} "
                               f"({largest / smallest:.1f}×; the rule: {IMBALANCE_RULE}); its accuracy "
                               "averages mostly over the large classes."})
    return warnings


def npz_labels(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The labels `y` and, when the file stores a split, `y_test` of an .npz already validated
    (core.engine.data.npz.summarize_npz); the images are not read."""
    with np.load(path, allow_pickle=False) as npz:
        y = np.asarray(npz["y"])
        y_test = np.asarray(npz["y_test"]) if "y_test" in npz.files else None
    return y, y_test
