"""The "auto" values of a fine-tune (`epochs`, `batch_size`, `lr`), from the training-set size.

One rule, torch-free, so that the API resolves it when a job is submitted (the job then shows
and stores the values it will run with) and the local CLI resolves it the same way. The rule
does not look at the device: the worker that runs a job is not known at submit time, and the
same job must train the same way on any machine.

- The validation split is carved out of the training images first (`validation_split_size`);
  the rule sees the images left for training, n.
- batch_size: the power of two just below n / 64, within [16, 512]: a set of 1,024 images or
  more gets at least 64 optimizer steps per epoch (digits' 1,151 images: 16, 71 steps, where the
  old fixed 512 gave 2), a large one the paper's 512 (CIFAR-10: 95 steps).
- lr: AUTO_LR = 0.0025 whatever the batch size. β = 6 can collapse a non-robust model in its
  first epoch when the steps are large, and the step size, not the batch's noise, is what
  matters: on digits (small CNN, 8 epochs) lr 0.0025 improved W2 robust accuracy at batch 16 in
  5 runs of 5 (+0.17 to +0.20) and at batch 64 in 2 of 2 (+0.09, +0.13), while at batch 64 the
  square-root rule's 0.005 and the linear rule's 0.01 dropped the validation W2 accuracy to
  0.00-0.11 after the first epoch in 4 runs of 4, 3 of which never beat the input (README,
  "What a fine-tune does"). An already robust model can take more (the earlier default for
  CIFAR-10 WideResNets was 0.01 at batch 512): set lr.
- epochs: about TARGET_STEPS (500) optimizer steps in all, between 2 and 10 epochs (digits: 8).
  On digits the validation W2 accuracy levels off after 250-400 steps at the auto lr, and on
  Fashion-MNIST most of the gain comes within the first 100.

Evaluation batches are different: they change no result (every batch's gradients are
independent in eval mode, and W-PGD normalises over the whole set), only speed, so their "auto"
is resolved where the evaluation runs, per device (`auto_eval_batch_size`):
- CUDA: large batches keep the GPU busy: 1,024 CIFAR-sized images (3×32×32), fewer for larger
  images (down to 64); an out-of-memory error halves it (core.engine.oom).
- CPU: small batches whose activations stay in the cache: about 2^18 input values per batch,
  a power of two in [32, 256] (CIFAR-sized: 64, 8×8 digits: 256). Measured on a 2-core AMD
  EPYC with W-PGD (images·steps/s, best of 5, 1 thread): PreAct-ResNet-18 peaks at 16-64
  (batch 256-500: about 0.65× of that), the digits CNN at 128-256 (batch 32: 0.70×).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from core.engine.config import AUTO, FinetuneConfig

MIN_BATCH, MAX_BATCH = 16, 512
IMAGES_PER_STEP_TARGET = 64      # n / 64 optimizer steps per epoch at the chosen batch size
AUTO_LR = 0.0025
TARGET_STEPS = 500
MIN_EPOCHS, MAX_EPOCHS = 2, 10
FEW_STEPS_PER_EPOCH = 10         # fewer than this: the job warns that it can hardly learn


def validation_split_size(n_available: int, config: FinetuneConfig) -> int:
    """Images held out of `n_available` training images to select the checkpoint (at least 1,
    and at least 1 left to train on)."""
    if n_available < 2:
        return 0
    wanted = min(config.validation_examples, round(config.validation_fraction * n_available))
    return min(max(wanted, 1), n_available - 1)


def auto_batch_size(n_train: int) -> int:
    target = max(n_train / IMAGES_PER_STEP_TARGET, 1.0)
    size = 1 << math.floor(math.log2(target))   # target ≥ 1: a power of two ≥ 1
    return max(MIN_BATCH, min(MAX_BATCH, size))


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps per epoch (the last partial batch is dropped)."""
    return max(1, n_train // max(1, min(batch_size, n_train)))


def auto_epochs(steps: int) -> int:
    return max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(TARGET_STEPS / steps)))


def resolve_finetune(config: FinetuneConfig, n_available: int) -> FinetuneConfig:
    """The config with every "auto" field replaced, for a training set of `n_available` images
    (before the validation split is carved out; `train_examples` already applied by the caller)."""
    if not config.unresolved:
        return config
    n_train = max(1, n_available - validation_split_size(n_available, config))
    values: dict[str, Any] = {}
    batch = config.batch_size if config.batch_size != AUTO else auto_batch_size(n_train)
    if config.batch_size == AUTO:
        values["batch_size"] = batch
    if config.lr == AUTO:
        values["lr"] = AUTO_LR
    if config.epochs == AUTO:
        values["epochs"] = auto_epochs(steps_per_epoch(n_train, int(batch)))
    return config.model_copy(update=values)


def few_steps_warning(n_train: int, batch_size: int) -> str | None:
    """The warning for a configuration that takes too few optimizer steps per epoch to learn."""
    steps = steps_per_epoch(n_train, batch_size)
    if steps >= FEW_STEPS_PER_EPOCH:
        return None
    return (f"batch_size {batch_size} gives only {steps} optimizer step(s) per epoch on {n_train} training "
            f"images (fewer than {FEW_STEPS_PER_EPOCH}): the model can hardly learn. Leave batch_size at "
            f"\"auto\" (here {auto_batch_size(n_train)}) or pick one at most {max(1, n_train // FEW_STEPS_PER_EPOCH)}.")


CUDA_EVAL_BATCH, CUDA_EVAL_VALUES = 1024, 1024 * 3 * 32 * 32
CPU_EVAL_VALUES = 2 ** 18
MIN_CUDA_EVAL_BATCH, MIN_CPU_EVAL_BATCH, MAX_CPU_EVAL_BATCH = 64, 32, 256


def _floor_pow2(v: float) -> int:
    return 1 << math.floor(math.log2(max(v, 1.0)))


def auto_eval_batch_size(device_type: str, image_shape: Sequence[int]) -> int:
    """The evaluation batch for images of `image_shape` (C, H, W) on a device of `device_type`
    ("cuda", "cpu", ...): large on a GPU, cache-sized on a CPU (module docstring)."""
    values = max(1, math.prod(int(v) for v in image_shape))
    if device_type == "cuda":
        return max(MIN_CUDA_EVAL_BATCH, min(CUDA_EVAL_BATCH, _floor_pow2(CUDA_EVAL_VALUES / values)))
    return max(MIN_CPU_EVAL_BATCH, min(MAX_CPU_EVAL_BATCH, _floor_pow2(CPU_EVAL_VALUES / values)))


def resolve_eval_batch_size(batch_size: int | str, device_type: str, image_shape: Sequence[int]) -> int:
    """An evaluation config's batch_size: the number as given, "auto" per device."""
    return auto_eval_batch_size(device_type, image_shape) if batch_size == AUTO else int(batch_size)
