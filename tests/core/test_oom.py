"""CUDA out-of-memory in evaluation and attack batches: the batch halves, the run goes on, an event says so.

The model below raises torch's real torch.cuda.OutOfMemoryError whenever a batch is larger than its
memory allows, as a GPU would; the recipes and attacks run unchanged around it.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from core.engine.config import EvaluateConfig, FinetuneConfig
from core.engine.data.datasets import ImageData, load_digits
from core.engine.hooks import Hooks
from core.engine.oom import AdaptiveBatch
from core.engine.recipes.evaluate import evaluate
from core.engine.recipes.finetune import finetune
from tests.core.conftest import TinyCNN


class SmallGpu(torch.nn.Module):
    """Runs `net`, but fails as CUDA does when a batch holds more than `capacity` images."""

    def __init__(self, net: torch.nn.Module, capacity: int) -> None:
        super().__init__()
        self.net, self.capacity = net, capacity
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.capacity:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {x.shape[0]}")
        self.batches.append(int(x.shape[0]))
        return self.net(x)


@pytest.fixture(scope="module")
def digits() -> ImageData:
    data = load_digits()
    data.test_x, data.test_y = data.test_x[:96], data.test_y[:96]
    return data


def _events() -> tuple[Hooks, list[tuple[str, str, dict[str, Any]]]]:
    seen: list[tuple[str, str, dict[str, Any]]] = []
    return Hooks(event=lambda *e: seen.append(e)), seen


def test_halving_retries_until_the_batch_fits_and_keeps_the_size() -> None:
    calls: list[int] = []
    halvings: list[tuple[int, int, str]] = []

    def attempt(size: int) -> int:
        calls.append(size)
        if size > 20:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return size

    batch = AdaptiveBatch(100, on_halve=lambda old, new, what: halvings.append((old, new, what)))
    assert batch.run("w-pgd", attempt) == 13
    assert calls == [100, 50, 25, 13] and halvings == [(100, 50, "w-pgd"), (50, 25, "w-pgd"), (25, 13, "w-pgd")]
    assert batch.run("pgd", attempt) == 13 and calls[-1] == 13   # the next step starts at the size that fit
    with pytest.raises(torch.cuda.OutOfMemoryError):
        AdaptiveBatch(3).run("x", lambda size: attempt(size + 100))   # not even one image fits: the error stays
    with pytest.raises(ValueError, match="boom"):   # other errors are not retried
        AdaptiveBatch(8).run("x", lambda size: (_ for _ in ()).throw(ValueError("boom")))


def test_evaluation_halves_its_batch_and_reports_the_same_numbers(digits: ImageData) -> None:
    torch.manual_seed(0)
    net = TinyCNN().eval()
    config = EvaluateConfig(threat_model={"kind": "w2-linf", "delta": 0.1}, batch_size=64, wpgd_steps=3,
                            pgd_steps=2, linf_attacks=["pgd"], n_examples=96)
    hooks, seen = _events()
    gpu = SmallGpu(net, capacity=20)
    report = evaluate(config, gpu, digits, hooks, device="cpu")
    assert max(gpu.batches) == 16   # 64 → 32 → 16 fits
    warnings = [(t, d["previous_batch_size"], d["batch_size"]) for t, _, d in seen]
    assert warnings == [("warning", 64, 32), ("warning", 32, 16)]
    # the pointwise attack runs first: it is a W2 member
    assert "CUDA out of memory in pgd" in seen[0][1] and "retrying with batch size 32" in seen[0][1]
    reference = evaluate(config.model_copy(update={"batch_size": 16}), net, digits, device="cpu")
    assert report.to_dict()["w2"] == reference.to_dict()["w2"]
    assert report.pointwise == reference.pointwise and report.clean_accuracy == reference.clean_accuracy


def test_finetune_held_out_evaluation_halves_but_training_batches_do_not(digits: ImageData) -> None:
    torch.manual_seed(0)
    gpu = SmallGpu(TinyCNN(), capacity=40)
    config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": 0.1}, epochs=1, batch_size=32,
                            train_examples=64, validation_examples=96, test_examples=96, attack_steps=1,
                            eval_wpgd_steps=1, eval_pgd_steps=1, test_wpgd_steps=1, test_pgd_steps=1,
                            budget_subset=32)
    hooks, seen = _events()
    result = finetune(config, gpu, digits, hooks, device="cpu")
    assert result.epochs_completed == 1
    # held-out evaluation starts at the CPU auto batch for 8×8 digits (256) and halves 256 → 128 → 64 → 32, once for
    # the run: on the 96 test images (the 13 validation images fit), whose pointwise attack runs first
    assert [(d["previous_batch_size"], d["batch_size"]) for _, _, d in seen] == [(256, 128), (128, 64), (64, 32)]
    assert all(d["phase"].startswith("autoattack") for _, _, d in seen)

    too_big = FinetuneConfig(**{**config.model_dump(), "batch_size": 64})
    with pytest.raises(torch.cuda.OutOfMemoryError):   # a training batch that does not fit fails the job
        finetune(too_big, SmallGpu(TinyCNN(), capacity=40), digits, Hooks(), device="cpu")
