"""The data set census: counts per class and split, its two warning rules, and that it counts
the images a job sees (the engine's own split of an .npz, the built-in data sets as loaded)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits as sklearn_digits

from core.engine.data.census import (
    BUILTIN_CLASS_COUNTS,
    IMBALANCE_RATIO,
    census_warnings,
    npz_labels,
    split_counts,
)
from core.engine.data.datasets import DEBIAN_FASHION_MNIST, load_digits, load_fashion_mnist, load_npz
from core.engine.data.sampling import class_counts


def test_a_class_missing_from_a_split_is_named_with_its_name() -> None:
    warnings = census_warnings({"train": [5, 5, 5], "test": [2, 0, 3]}, ["cat", "dog", "owl"])
    assert [(w["code"], w["split"], w["classes"]) for w in warnings] == [("class_missing", "test", [1])]
    assert "1 (dog)" in warnings[0]["message"] and "never measured" in warnings[0]["message"]
    learnt = census_warnings({"train": [0, 4]})
    assert learnt[0]["classes"] == [0] and "never learnt" in learnt[0]["message"]


def test_imbalance_warns_above_the_ratio_only() -> None:
    at_ratio = [int(IMBALANCE_RATIO) * 3, 3, 10]
    assert census_warnings({"train": at_ratio}) == []                  # exactly 10×: no warning
    above = census_warnings({"train": [31, 3, 10], "test": [4, 4, 4]})
    assert [(w["code"], w["split"], w["classes"]) for w in above] == [("class_imbalance", "train", [1, 0])]
    assert "31 images" in above[0]["message"] and "10.3×" in above[0]["message"]
    # a missing class is reported as missing; the ratio is over the classes present
    both = census_warnings({"test": [0, 50, 2]})
    assert [w["code"] for w in both] == ["class_missing", "class_imbalance"]


def test_split_counts_of_an_npz_are_those_the_engine_loads(tmp_path: Path) -> None:
    digits = sklearn_digits()
    order = np.argsort(digits.target, kind="stable")            # stored class by class
    x = np.round(digits.images[order] * (255 / 16)).astype(np.uint8)
    y = digits.target[order].astype(np.int64)
    path = tmp_path / "sorted.npz"
    np.savez(path, x=x, y=y)
    loaded = load_npz(path)
    counts = split_counts(*npz_labels(path), 10)
    assert counts == {"train": class_counts(loaded.train_y.numpy(), 10),
                      "test": class_counts(loaded.test_y.numpy(), 10)}
    assert sum(counts["train"]) + sum(counts["test"]) == len(y) and min(counts["test"]) > 0

    stored = tmp_path / "stored.npz"                            # a stored split is counted as stored
    np.savez(stored, x=x[:100], y=y[:100], x_test=x[100:120], y_test=y[100:120])
    assert split_counts(*npz_labels(stored), 10) == {"train": class_counts(y[:100], 10),
                                                     "test": class_counts(y[100:120], 10)}
    assert census_warnings(split_counts(*npz_labels(stored), 10))[0]["classes"] == list(range(1, 10))


def test_builtin_counts_are_those_of_the_loaded_data() -> None:
    digits = load_digits()
    assert BUILTIN_CLASS_COUNTS["digits"] == {"train": class_counts(digits.train_y.numpy(), 10),
                                              "test": class_counts(digits.test_y.numpy(), 10)}
    assert Path(DEBIAN_FASHION_MNIST).is_dir(), "make test installs Debian's dataset-fashion-mnist"
    fashion = load_fashion_mnist(data_dir="/nonexistent")
    assert BUILTIN_CLASS_COUNTS["fashion-mnist"] == {"train": class_counts(fashion.train_y.numpy(), 10),
                                                     "test": class_counts(fashion.test_y.numpy(), 10)}
    for name, counts in BUILTIN_CLASS_COUNTS.items():
        assert census_warnings(counts) == [], name


def test_an_empty_split_warns_every_class_missing_once() -> None:
    warnings = census_warnings({"test": [0] * 3})
    assert [(w["code"], w["classes"]) for w in warnings] == [("class_missing", [0, 1, 2])]
