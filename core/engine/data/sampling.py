"""Subsets that are samples: seeded, stratified random draws of N images, and their record.

Every "use only N images" in the engine (a fine-tune's `train_examples`, `validation_examples`,
`test_examples` and budget subset, an evaluation's `n_examples`) goes through
`stratified_indices`, never through "the first N": an image-folder upload is stored class by class,
so its first 400 training images are two classes out of ten.

The draw, for labels y (N images, k classes present) and a sample size n < N:
- allocation: class c gets n·N_c/N images, rounded by largest remainder (Hamilton's method) so the
  counts add up to n exactly; when n ≥ k every class gets at least one (taken back from the
  classes whose share is most over their quota), so a small sample still sees every class; when
  n < k the n classes with the largest quotas win (ties broken by the seed);
- within each class a uniform draw without replacement;
- the indices come back in a seeded random order, so that a prefix of the sample is itself a
  random sample (a caller that later keeps the first m, e.g. AutoAttack's subset, stays unbiased).
n ≥ N returns every index in stored order: the whole set, nothing drawn.

The draw is a function of (labels, n, seed) alone: the same seed picks the same images on any
machine (numpy's PCG64), so an `evaluate` with the fine-tune's seed and test size sees the
fine-tune's test images. `sample_record` is what goes into a report's provenance.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["class_counts", "sample_record", "stratified_indices"]

IntArray = npt.NDArray[np.int64]


def stratified_indices(labels: npt.ArrayLike, n: int | None, seed: int) -> IntArray:
    """A seeded, stratified random sample of `n` indices into `labels` (module docstring);
    `n` None or ≥ len(labels): all of them, in stored order."""
    y = np.asarray(labels).reshape(-1)
    total = len(y)
    if n is None or n >= total:
        return np.arange(total, dtype=np.int64)
    if n < 1:
        raise ValueError(f"a sample needs at least 1 image, got n={n}")
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(y, return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(classes))
    allocation = _allocate(sizes, n, rng)
    chosen = [rng.choice(np.flatnonzero(inverse == c), size=int(k), replace=False)
              for c, k in enumerate(allocation) if k > 0]
    return rng.permutation(np.concatenate(chosen)).astype(np.int64)


def _allocate(sizes: IntArray, n: int, rng: np.random.Generator) -> IntArray:
    """Images per class: proportional to `sizes`, summing to n, at least 1 each when n ≥ classes."""
    quota = n * sizes / sizes.sum()
    order_noise = rng.random(len(sizes))          # breaks ties between equal remainders, seeded
    counts: IntArray = np.floor(quota).astype(np.int64)
    if n >= len(sizes):
        counts = np.maximum(counts, 1)
    counts = np.minimum(counts, sizes)
    while counts.sum() < n:                       # hand out the rest by largest remainder
        room = counts < sizes
        gap = np.where(room, quota - counts, -np.inf)
        counts[np.lexsort((order_noise, gap))[-1]] += 1
    while counts.sum() > n:                       # the minimum of 1 overshot: take from the most over quota
        spare = counts > 1
        excess = np.where(spare, counts - quota, -np.inf)
        counts[np.lexsort((order_noise, excess))[-1]] -= 1
    return counts


def class_counts(labels: npt.ArrayLike, num_classes: int | None = None) -> list[int]:
    """Images per class label 0..K-1 (K: `num_classes`, else the largest label + 1)."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    width = num_classes if num_classes is not None else (int(y.max()) + 1 if len(y) else 0)
    return [int(v) for v in np.bincount(y, minlength=width)[:width]]


def sample_record(labels: npt.ArrayLike, indices: npt.ArrayLike, seed: int,
                  num_classes: int | None = None) -> dict[str, Any]:
    """The provenance of a sample of `labels` at `indices`: how it was drawn, its size, the images
    per class it holds (index = class label), classes of the population it missed, and a digest
    of the indices (the same digest: the same images, in the same order)."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    width = num_classes if num_classes is not None else (int(y.max()) + 1 if len(y) else 0)
    population, drawn = class_counts(y, width), class_counts(y[idx], width)
    whole = len(idx) == len(y)
    return {
        "method": "all images" if whole else "stratified random sample",
        "seed": seed, "n": len(idx), "population": len(y),
        "per_class": drawn,
        "classes_missing": [c for c in range(width) if population[c] > 0 and drawn[c] == 0],
        "indices_sha256": hashlib.sha256(idx.tobytes()).hexdigest(),
    }
