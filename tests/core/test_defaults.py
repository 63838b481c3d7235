"""The "auto" values of a fine-tune, the checkpoint-selection rule, and the evaluation's headline radius."""
from __future__ import annotations

import pytest

from api.compatibility import BUILTIN_CLASSES_AND_TRAIN
from api.schemas import BUILTIN_DATASETS
from core.engine.attacks.wpgd import converged
from core.engine.config import EvaluateConfig, FinetuneConfig, SelectionRule
from core.engine.data.datasets import load_dataset
from core.engine.defaults import (
    FEW_STEPS_PER_EPOCH,
    auto_batch_size,
    few_steps_warning,
    resolve_finetune,
    steps_per_epoch,
    validation_split_size,
)
from core.engine.recipes.finetune import is_better, is_eligible


def test_digits_defaults_take_enough_steps() -> None:
    config = resolve_finetune(FinetuneConfig(), 1438)        # digits' training split
    n_val = validation_split_size(1438, config)
    assert n_val == 288                                     # 20 % held out for checkpoint selection
    assert (config.batch_size, config.lr, config.epochs) == (16, 0.0025, 8)
    assert steps_per_epoch(1438 - n_val, config.batch_size) == 71   # was 2 with the old batch of 512


@pytest.mark.parametrize("n", [300, 1000, 1438, 3000, 10_000, 50_000, 60_000, 1_281_167])
def test_auto_rule_over_data_set_sizes(n: int) -> None:
    config = resolve_finetune(FinetuneConfig(), n)
    n_train = n - validation_split_size(n, config)
    steps = steps_per_epoch(n_train, config.batch_size)
    assert 16 <= config.batch_size <= 512 and config.batch_size & (config.batch_size - 1) == 0
    if n_train >= 16 * 64:                       # not capped by the smallest batch: ≥ 64 steps per epoch
        assert steps >= 64
    assert steps >= min(50, n_train // 16)
    assert 2 <= config.epochs <= 10                          # about 500 optimizer steps in all
    assert config.epochs == 10 or config.epochs * steps >= 500
    assert config.epochs == 2 or (config.epochs - 1) * steps < 500
    assert config.lr == 0.0025                             # the batch size does not raise it (core.engine.defaults)
    assert few_steps_warning(n_train, config.batch_size) is None or n_train < 16 * FEW_STEPS_PER_EPOCH


def test_explicit_values_are_kept_and_auto_ones_filled_in() -> None:
    config = resolve_finetune(FinetuneConfig(batch_size=64, epochs=3), 1438)
    assert (config.batch_size, config.epochs, config.lr) == (64, 3, 0.0025)
    assert config.unresolved == []
    assert resolve_finetune(config, 10) is config          # nothing left to resolve


def test_too_few_steps_per_epoch_warns_with_the_numbers() -> None:
    message = few_steps_warning(1150, 512)
    assert message is not None and "2 optimizer step(s)" in message and "1150" in message and "16" in message
    assert few_steps_warning(1150, 115) is None            # exactly 10 steps
    assert few_steps_warning(1150, 116) is not None
    assert auto_batch_size(1150) == 16


def test_builtin_dataset_facts_match_the_loaded_data(tmp_path) -> None:
    for name in ("digits", "fashion-mnist"):
        data = load_dataset(name, data_dir=tmp_path)
        classes, train = BUILTIN_CLASSES_AND_TRAIN[name]
        assert (classes, train) == (data.num_classes, data.train_x.shape[0]), name
        assert list(data.image_shape) == BUILTIN_DATASETS[name]


def test_selection_rule_metric_follows_the_threat() -> None:
    assert FinetuneConfig().selection.metric == "w2_robust_accuracy"
    assert FinetuneConfig(threat_model={"kind": "linf"}).selection.metric == "linf_robust_accuracy"
    assert FinetuneConfig(threat_model={"kind": "w2-l2"}).selection.metric == "w2_robust_accuracy"
    with pytest.raises(ValueError, match="not measured"):
        FinetuneConfig(threat_model={"kind": "w2-l2"}, selection={"metric": "linf_robust_accuracy"})


def test_selection_rule_prefers_the_input_on_ties_and_respects_the_clean_drop() -> None:
    rule = SelectionRule(metric="w2_robust_accuracy", max_clean_drop=0.05)
    before = {"clean_accuracy": 0.95, "w2_robust_accuracy": 0.40}
    assert is_eligible(before, before, rule)
    tie = {"clean_accuracy": 0.95, "w2_robust_accuracy": 0.40}
    assert not is_better(tie, before, before, rule)                       # the input keeps a tie
    gain = {"clean_accuracy": 0.91, "w2_robust_accuracy": 0.55}
    assert is_better(gain, before, before, rule)
    collapsed = {"clean_accuracy": 0.58, "w2_robust_accuracy": 0.60}       # more robust, far less accurate
    assert not is_eligible(collapsed, before, rule) and not is_better(collapsed, before, before, rule)
    assert is_better(collapsed, before, before, SelectionRule(metric="w2_robust_accuracy", max_clean_drop=None))


def test_evaluation_headline_radius() -> None:
    at_delta = EvaluateConfig(threat_model={"delta": 0.05}, deltas=[0.01, 0.05, 0.1])
    assert at_delta.headline_delta == (0.05, "threat_model")
    largest = EvaluateConfig(threat_model={"delta": 0.2}, deltas=[0.01, 0.05, 0.1])
    assert largest.headline_delta == (0.1, "largest_radius")
    assert EvaluateConfig().headline_delta == (pytest.approx(8 / 255), "threat_model")


def test_wpgd_convergence_means_no_new_minimum_in_the_last_quarter() -> None:
    assert converged([0.9, 0.6, 0.5, 0.5, 0.5])                 # minimum by step 2 of 4
    assert not converged([0.9, 0.8, 0.7, 0.6, 0.5])             # still falling at the end
    steps = [1.0 - 0.01 * t for t in range(38)] + [0.63] * 13  # 50 steps, lowest at step 37
    assert converged(steps)
    assert not converged([*steps[:-1], 0.62])                   # a new low at step 50
