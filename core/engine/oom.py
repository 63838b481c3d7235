"""Evaluation and attack batches that adapt to GPU memory.

A CUDA out-of-memory error in an evaluation or attack halves the batch and runs that step
again; the smaller size is kept for the rest of the job, and `on_halve` reports each halving
(the worker writes it to the job's events). Attacks on a set give the same result for any batch
size (each batch's gradients are independent in eval mode), so only time is lost. Training
batches never change size: that would change the recipe (the job fails with
cuda_out_of_memory and says to lower batch_size).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class AdaptiveBatch:
    """A batch size that halves on torch.cuda.OutOfMemoryError, down to 1."""

    def __init__(self, size: int, on_halve: Callable[[int, int, str], None] | None = None) -> None:
        if size < 1:
            raise ValueError(f"batch size must be ≥ 1, got {size}")
        self.size = size
        self.on_halve = on_halve

    def run(self, what: str, attempt: Callable[[int], T]) -> T:
        """attempt(batch_size), retried with half the batch after each out-of-memory error."""
        while True:
            try:
                return attempt(self.size)
            except torch.cuda.OutOfMemoryError:
                if self.size == 1:
                    raise
            # Outside the except block the failed attempt's frames, and the tensors they hold, are freed.
            old, self.size = self.size, (self.size + 1) // 2
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            if self.on_halve is not None:
                self.on_halve(old, self.size, what)


def report_halving(event: Callable[[str, str, dict[str, Any]], None]) -> Callable[[int, int, str], None]:
    """An on_halve that writes a warning event: what ran out of memory, and the new batch size."""
    def on_halve(old: int, new: int, what: str) -> None:
        event("warning", f"CUDA out of memory in {what} with batch size {old}; retrying with batch size {new}",
              {"reason": "cuda_out_of_memory", "phase": what, "batch_size": new, "previous_batch_size": old})
    return on_halve
