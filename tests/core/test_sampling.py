"""Seeded stratified samples (core.engine.data.sampling): counts per class, determinism, every class."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from core.engine.data.sampling import class_counts, sample_record, stratified_indices

# Digits' labels sorted by class: how an image-folder upload is stored.
DIGITS_SORTED = np.sort(load_digits().target.astype(np.int64))
# Unequal classes, one of them rare: proportional shares are not all equal.
SKEWED = np.repeat(np.arange(6), [400, 200, 100, 50, 30, 4])


@pytest.mark.parametrize("labels", [DIGITS_SORTED, SKEWED], ids=["digits-sorted", "skewed"])
@pytest.mark.parametrize("n", [6, 10, 37, 200, 600])
def test_sample_size_distinct_and_proportional(labels: np.ndarray, n: int) -> None:
    idx = stratified_indices(labels, n, seed=3)
    assert len(idx) == n and len(np.unique(idx)) == n
    assert idx.min() >= 0 and idx.max() < len(labels)
    population = np.bincount(labels)
    drawn = np.bincount(labels[idx], minlength=len(population))
    quota = n * population / population.sum()
    k = len(population)
    if n >= k:
        assert (drawn >= 1).all(), f"a class is missing from {drawn}"
    # every class within one image of its quota, except where the minimum of one lifted it
    # (the rare class) and the classes that paid for that lift (at most k extra images in all)
    lifted = (drawn == 1) & (quota < 1)
    assert (np.abs(drawn - quota)[~lifted] <= 1 + lifted.sum()).all(), (drawn, quota)


def test_the_first_n_of_a_sorted_set_is_not_what_is_drawn() -> None:
    """The bug of issue 17: the first 400 of a class-sorted set hold 3 classes; the sample all 10."""
    assert len(np.unique(DIGITS_SORTED[:400])) < 4
    idx = stratified_indices(DIGITS_SORTED, 400, seed=0)
    assert sorted(np.unique(DIGITS_SORTED[idx])) == list(range(10))


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    a = stratified_indices(DIGITS_SORTED, 100, seed=7)
    assert np.array_equal(a, stratified_indices(DIGITS_SORTED, 100, seed=7))
    assert not np.array_equal(np.sort(a), np.sort(stratified_indices(DIGITS_SORTED, 100, seed=8)))


def test_order_is_shuffled_so_a_prefix_is_a_sample() -> None:
    idx = stratified_indices(DIGITS_SORTED, 500, seed=0)
    assert not np.all(np.diff(idx) > 0)
    assert len(np.unique(DIGITS_SORTED[idx[:50]])) >= 8   # the first 50 are not one or two classes


def test_fewer_images_than_classes_takes_the_largest_shares() -> None:
    idx = stratified_indices(SKEWED, 2, seed=0)
    assert sorted(SKEWED[idx].tolist()) == [0, 1]


def test_whole_set_or_more_is_every_index_in_stored_order() -> None:
    for n in (None, len(SKEWED), len(SKEWED) + 5):
        assert np.array_equal(stratified_indices(SKEWED, n, seed=1), np.arange(len(SKEWED)))


def test_bad_size_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        stratified_indices(SKEWED, 0, seed=0)


def test_record_counts_classes_and_names_the_missing() -> None:
    idx = stratified_indices(SKEWED, 3, seed=0)
    record = sample_record(SKEWED, idx, seed=0)
    assert record["method"] == "stratified random sample" and record["seed"] == 0
    assert record["n"] == 3 and record["population"] == len(SKEWED)
    assert record["per_class"] == class_counts(SKEWED[idx], 6) and sum(record["per_class"]) == 3
    assert record["classes_missing"] == [c for c in range(6) if record["per_class"][c] == 0]
    # quotas 1.53, 0.77, 0.38, ...: floors 1, 0, 0; the two largest remainders (.77, .53) get one more
    assert record["per_class"] == [2, 1, 0, 0, 0, 0] and record["classes_missing"] == [2, 3, 4, 5]
    whole = sample_record(SKEWED, np.arange(len(SKEWED)), seed=0)
    assert whole["method"] == "all images" and whole["per_class"] == [400, 200, 100, 50, 30, 4]
    assert whole["classes_missing"] == []
    assert record["indices_sha256"] != sample_record(SKEWED, idx[::-1], seed=0)["indices_sha256"]
