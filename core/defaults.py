"""The "auto" values of a fine-tune (`epochs`, `batch_size`, `lr`), from the training-set size.

One rule, torch-free, so that the API resolves it when a job is submitted (the job then shows
and stores the values it will run with) and the local CLI resolves it the same way. The rule
does not look at the device: the worker that runs a job is not known at submit time, and the
same job must train the same way on any machine.

- The validation split is carved out of the training images first (`validation_split_size`);
  the rule sees the images left for training, n.
- batch_size: the power of two nearest below n / 64, within [16, 512]. A small set gets at
  least ~64 optimizer steps per epoch (digits' 1,150 images: 16 → 71 steps; with 2,048 per
  epoch the old fixed 512 gave 2), a large one the paper's 512 (CIFAR-10: 95 steps).
- lr: LR_PER_SQRT_BATCH · √batch_size (0.0025 at 16, 0.01 at 256, 0.0141 at 512): square-root
  scaling keeps the noise of SGD about constant across batch sizes; the constant was chosen by
  experiment on digits and Fashion-MNIST with β = 6 (README, "Defaults that fit the data").
- epochs: about TARGET_STEPS optimizer steps in all, between 2 and 10 epochs.
"""
from __future__ import annotations

import math
from typing import Any

from core.config import AUTO, FinetuneConfig

MIN_BATCH, MAX_BATCH = 16, 512
IMAGES_PER_STEP_TARGET = 64      # n / 64 optimizer steps per epoch at the chosen batch size
LR_PER_SQRT_BATCH = 0.000625     # lr = this · √batch_size
TARGET_STEPS = 1000
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
    size = 2 ** int(math.floor(math.log2(target)))
    return max(MIN_BATCH, min(MAX_BATCH, size))


def auto_lr(batch_size: int) -> float:
    return round(LR_PER_SQRT_BATCH * math.sqrt(batch_size), 6)


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
        values["lr"] = auto_lr(int(batch))
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
