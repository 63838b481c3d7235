"""The fine-tuning and evaluation recipes on real digits with the zoo's small CNN."""
from __future__ import annotations

import pytest
import torch

from core.engine.checkpoint import load_training_checkpoint
from core.engine.config import EvaluateConfig, FinetuneConfig
from core.engine.data.datasets import load_dataset
from core.engine.hooks import Hooks
from core.engine.recipes.evaluate import evaluate
from core.engine.recipes.finetune import finetune
from core.engine.recipes.standard import train_standard
from core.engine.zoo import create_model

# δ = 0.1 on 8×8 digits: a radius where a normally trained CNN loses most of its W2 accuracy,
# so the gain from W-TRADES is well above run-to-run noise.
DELTA = 0.1


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory):
    return load_dataset("digits", data_dir=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def base_model(digits_data):
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    return train_standard(model, digits_data, epochs=10, seed=0)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fresh(base_model) -> torch.nn.Module:
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    model.load_state_dict(_state(base_model))
    return model


def _config(**overrides) -> FinetuneConfig:
    fields = dict(threat_model={"kind": "w2-linf", "delta": DELTA}, epochs=8, batch_size=64, lr=0.003, beta=3.0,
                  attack_steps=5, validation_examples=400, eval_wpgd_steps=20, eval_pgd_steps=10, test_wpgd_steps=10,
                  test_pgd_steps=5, evaluation="quick", seed=0)
    fields.update(overrides)
    return FinetuneConfig(**fields)


def test_interrupted_run_resumed_from_checkpoint_ends_with_the_same_weights(base_model, digits_data, tmp_path) -> None:
    config = _config(epochs=3, validation_examples=100, test_examples=100,
                     eval_wpgd_steps=5, eval_pgd_steps=3, attack_steps=3)
    uninterrupted = finetune(config, _fresh(base_model), digits_data)

    class WorkerDied(Exception):
        pass

    path = tmp_path / "state.safetensors"

    def crash_after_first_epoch(ckpt) -> None:
        ckpt.save(path)
        if ckpt.epoch == 1:
            raise WorkerDied

    with pytest.raises(WorkerDied):
        finetune(config, _fresh(base_model), digits_data, Hooks(checkpoint=crash_after_first_epoch))
    state = load_training_checkpoint(path)
    assert state.epoch == 1
    # resume into a model with different (random) weights: everything must come from the checkpoint
    resumed = finetune(config, create_model("small-cnn", num_classes=10, in_channels=1, image_size=8),
                       digits_data, resume=state)
    assert resumed.epochs_completed == 3 and len(resumed.history) == 3
    for key, value in uninterrupted.last_model_state.items():
        assert torch.equal(value, resumed.last_model_state[key]), key
    assert resumed.best_epoch == uninterrupted.best_epoch
    assert resumed.history[-1]["w2_robust_accuracy"] == uninterrupted.history[-1]["w2_robust_accuracy"]


def test_cancellation_stops_within_an_epoch_and_saves_a_checkpoint(base_model, digits_data) -> None:
    config = _config(epochs=4, validation_examples=100, test_examples=100,
                     eval_wpgd_steps=5, eval_pgd_steps=3, attack_steps=2)
    calls = {"progress": 0}
    saved = []

    def progress(fraction: float, phase: str, metrics: dict) -> None:
        calls["progress"] += 1
        assert 0.0 <= fraction <= 1.0

    def stop() -> bool:          # cancel once the second epoch has started
        return calls["progress"] > 0 and bool(saved)

    result = finetune(config, _fresh(base_model), digits_data,
                      Hooks(progress=progress, should_stop=stop, checkpoint=saved.append))
    assert result.stopped
    assert result.epochs_completed == 1
    assert saved[0].epoch == 1 and not saved[0].final
    assert saved[-1].final and saved[-1].extra["partial"]["epoch"] == 2
    assert len(saved) == 2


def test_run_stopped_inside_an_epoch_resumes_exactly(base_model, digits_data, tmp_path) -> None:
    """A cancel or a lost worker mid-epoch saves a state from which the epoch finishes as if
    nothing had happened: same shuffle, same random draws, schedule not replayed."""
    config = _config(epochs=2, validation_examples=100, test_examples=100,
                     eval_wpgd_steps=5, eval_pgd_steps=3, attack_steps=2)
    uninterrupted = finetune(config, _fresh(base_model), digits_data)
    seen = {"epoch": 0, "step": 0}

    def progress(fraction: float, phase: str, metrics: dict) -> None:
        seen["epoch"], seen["step"] = metrics.get("epoch", 0), metrics.get("step", 0)

    saved = []
    stopped = finetune(config, _fresh(base_model), digits_data,
                       Hooks(progress=progress, should_stop=lambda: seen["epoch"] == 2 and seen["step"] >= 10,
                             checkpoint=saved.append))
    assert stopped.stopped and saved[-1].extra["partial"] == {**saved[-1].extra["partial"], "epoch": 2,
                                                              "steps_done": 10}
    path = tmp_path / "partial.safetensors"
    saved[-1].save(path)
    resumed = finetune(config, create_model("small-cnn", num_classes=10, in_channels=1, image_size=8),
                       digits_data, resume=load_training_checkpoint(path))
    assert resumed.epochs_completed == 2 and len(resumed.history) == 2
    for key, value in uninterrupted.last_model_state.items():
        assert torch.equal(value, resumed.last_model_state[key]), key
    assert resumed.history[-1]["train_loss"] == pytest.approx(uninterrupted.history[-1]["train_loss"], rel=1e-12)
    assert resumed.history[-1]["lr"] == uninterrupted.history[-1]["lr"]


def test_cancel_during_the_heldout_evaluation_stops_its_attacks_and_redoes_it_on_resume(
        base_model, digits_data, tmp_path) -> None:
    """A cancel while an epoch's held-out W-PGD runs ends it within a step (not after all its steps),
    saves the trained epoch as a partial checkpoint, and a resumed run evaluates that epoch again."""
    config = _config(epochs=2, train_examples=148, validation_examples=20, test_examples=20, eval_wpgd_steps=40,
                     eval_pgd_steps=40, attack_steps=2)
    seen = {"phase": None, "epoch": 0, "checks": 0}

    def progress(fraction: float, phase: str, metrics: dict) -> None:
        seen["phase"], seen["epoch"] = phase, metrics.get("epoch", seen["epoch"])

    def stop() -> bool:  # cancel during the first epoch's evaluation, at its fourth check
        if seen["phase"] == "evaluate" and seen["epoch"] == 1:
            seen["checks"] += 1
            return seen["checks"] > 3
        return False

    saved = []
    result = finetune(config, _fresh(base_model), digits_data,
                      Hooks(progress=progress, should_stop=stop, checkpoint=saved.append))
    assert result.stopped and result.epochs_completed == 0 and result.history == []
    # W-PGD stopped at the 4th of its 40 steps, PGD at its first step, then the recipe's own check
    assert seen["checks"] == 6
    partial = saved[-1].extra["partial"]
    assert len(saved) == 1 and partial["epoch"] == 1 and partial["steps_done"] == 128 // 64
    path = tmp_path / "stopped-in-eval.safetensors"
    saved[-1].save(path)
    resumed = finetune(config, create_model("small-cnn", num_classes=10, in_channels=1, image_size=8),
                       digits_data, resume=load_training_checkpoint(path))
    assert [h["epoch"] for h in resumed.history] == [1, 2] and not resumed.stopped
    assert 0.0 <= resumed.history[0]["w2_robust_accuracy"] <= resumed.history[0]["clean_accuracy"]


def test_cancel_before_training_starts_keeps_nothing(base_model, digits_data) -> None:
    checks = []
    result = finetune(_config(validation_examples=20, eval_wpgd_steps=500), _fresh(base_model), digits_data,
                      Hooks(should_stop=lambda: checks.append(1) or len(checks) >= 2))
    assert result.stopped and result.epochs_completed == 0 and result.best_epoch == 0
    assert len(checks) <= 5  # the initial evaluation's attacks stopped at once, not after 500 steps


def test_plain_trades_is_the_same_loop_with_a_pointwise_threat(base_model, digits_data) -> None:
    config = _config(threat_model={"kind": "linf", "delta": DELTA}, attack_loss="kl", epochs=2,
                     validation_examples=200, eval_wpgd_steps=10, eval_pgd_steps=5)
    result = finetune(config, _fresh(base_model), digits_data)
    assert {"clean_accuracy", "w2_robust_accuracy", "linf_robust_accuracy"} <= set(result.after)
    assert result.selection["metric"] == "linf_robust_accuracy"     # the job's own threat picks the best
    assert result.history[-1]["mean_batch_delta"] == pytest.approx(DELTA)   # no dynamic budget for W∞
    assert result.improved
    assert result.after["linf_robust_accuracy"] > result.before["linf_robust_accuracy"]
    assert result.after["delta"] == DELTA and result.after["threat_model"] == "linf"


def test_dynamic_budget_keeps_the_mean_batch_radius_at_delta(base_model, digits_data) -> None:
    """δ_B = δ·Υ_B/Ῡ varies per batch, and the running Ῡ keeps the epoch's mean δ_B within 10 % of δ
    from the first epoch on (auto batch size: 71 steps per epoch on digits)."""
    config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, epochs=1, validation_examples=50,
                            test_examples=50, eval_wpgd_steps=3, eval_pgd_steps=2, test_wpgd_steps=3,
                            test_pgd_steps=2)
    result = finetune(config, _fresh(base_model), digits_data)
    row = result.history[0]
    assert row["mean_batch_delta"] == pytest.approx(DELTA, rel=0.10), row
    assert row["mean_batch_delta"] != pytest.approx(DELTA, rel=1e-6)      # δ_B really depends on the batch
    assert row["mean_batch_delta_ratio"] == pytest.approx(row["mean_batch_delta"] / DELTA)
    assert row["upsilon_ema"] > 0


def test_selection_on_validation_and_the_test_set_only_for_the_reported_numbers(base_model, digits_data,
                                                                                monkeypatch) -> None:
    import core.engine.recipes.before_after as before_after
    import core.engine.recipes.finetune as recipe

    evaluated: list[int] = []
    tested: list[int] = []
    real, real_measure = recipe.evaluate_heldout, before_after.measure

    def counting(model, x, y, *args, **kwargs):
        evaluated.append(int(x.shape[0]))
        return real(model, x, y, *args, **kwargs)

    def counting_tests(model, test, say):
        tested.append(int(test.x.shape[0]))
        return real_measure(model, test, say)

    monkeypatch.setattr(recipe, "evaluate_heldout", counting)
    monkeypatch.setattr(before_after, "measure", counting_tests)
    config = _config(epochs=3, validation_examples=150, test_examples=120, eval_wpgd_steps=5, eval_pgd_steps=3,
                     attack_steps=3)
    result = finetune(config, _fresh(base_model), digits_data)
    split = result.provenance["validation_split"]
    n_val, n_test = split["validation_examples"], 120
    assert abs(n_val - 150) <= 10 and n_val != n_test
    # the input and every epoch on the validation split; the test split once the run is over, for the input
    # and (when it differs) the chosen checkpoint
    assert evaluated == [n_val] * (1 + 3)
    assert tested == [n_test] * (2 if result.best_epoch > 0 else 1)
    assert result.provenance["examples"] == {"train": split["train_examples"], "validation": n_val,
                                             "test": n_test, "train_available": digits_data.train_x.shape[0]}
    assert split["train_examples"] + n_val == digits_data.train_x.shape[0]
    assert split["seed"] == 0 and split["method"].startswith("stratified")
    # stratified: every class is in the validation split in about its training share
    labels = digits_data.train_y.numpy()
    again = recipe.validation_split(digits_data.train_y, config)
    val_labels = labels[again[1]]
    assert set(val_labels.tolist()) == set(range(10))
    for c in range(10):
        assert abs((val_labels == c).mean() - (labels == c).mean()) < 0.02
    assert not set(again[0].tolist()) & set(again[1].tolist())
    # the selection rule and the numbers it chose by
    assert result.selection["split"] == "validation" and result.selection["metric"] == "w2_robust_accuracy"
    best_row = result.validation["best"]
    assert result.selection["best_validation_value"] == best_row["w2_robust_accuracy"]
    assert best_row["w2_robust_accuracy"] == max([result.validation["before"]["w2_robust_accuracy"]]
                                                 + [h["w2_robust_accuracy"] for h in result.history
                                                    if h["clean_accuracy"] >= result.validation["before"]
                                                    ["clean_accuracy"] - 0.10])


def test_a_run_that_cannot_help_hands_back_the_input(base_model, digits_data) -> None:
    config = _config(epochs=1, lr=1e-9, validation_examples=150, test_examples=120, eval_wpgd_steps=5,
                     eval_pgd_steps=3, attack_steps=2)
    warned: list[str] = []
    result = finetune(config, _fresh(base_model), digits_data, Hooks(warn=lambda m, d: warned.append(m)))
    assert result.best_epoch == 0 and not result.improved
    for key, value in _state(base_model).items():
        assert torch.equal(result.best_model_state[key], value), key
    assert result.after == result.before                   # the same weights: the same numbers
    assert result.summary["change"]["w2_robust_accuracy"] == 0.0
    assert any("no fine-tuned epoch beat the input model" in w for w in result.warnings)
    assert warned == result.warnings                       # each warning was also reported as it happened


def test_too_few_optimizer_steps_per_epoch_warn_with_the_numbers(base_model, digits_data) -> None:
    warned: list[tuple[str, dict]] = []
    config = _config(epochs=1, batch_size=512, validation_examples=100, test_examples=50, eval_wpgd_steps=2,
                     eval_pgd_steps=2, attack_steps=1)
    result = finetune(config, _fresh(base_model), digits_data, Hooks(warn=lambda m, d: warned.append((m, d))))
    message, data = warned[0]                                # told before the first epoch starts
    assert "batch_size 512 gives only 2 optimizer step(s) per epoch" in message and "auto" in message
    assert data == {"steps_per_epoch": 2, "batch_size": 512, "train_examples": 1338}   # 1,438 less 100 held out
    assert result.warnings[0] == message


def test_default_evaluation_runs_in_float32_while_training_may_use_bf16(base_model, digits_data) -> None:
    """Forward hooks record whether autocast was on: the validation and test attacks never use it,
    even when the training step is asked to run in bf16."""
    from core.engine.device import Compute

    phase = {"now": ""}
    seen: list[tuple[str, bool]] = []
    model = _fresh(base_model)
    model.register_forward_hook(lambda m, i, o: seen.append((phase["now"], torch.is_autocast_enabled("cpu"))))
    config = _config(epochs=1, amp="bf16", validation_examples=40, test_examples=40, eval_wpgd_steps=2,
                     eval_pgd_steps=2, attack_steps=1, batch_size=128)
    finetune(config, model, digits_data, Hooks(progress=lambda f, p, m: phase.update(now=p)), device="cpu")
    measured = [on for p, on in seen if p in ("evaluate", "test")]
    trained = [on for p, on in seen if p == "train"]
    assert measured and not any(measured)
    assert trained and all(trained)                         # the hook does see autocast when it is on
    seen.clear()
    evaluate(EvaluateConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, n_examples=40, wpgd_steps=2,
                            pgd_steps=2, evaluation="quick", audit=False), model, digits_data, device="cpu")
    assert seen and not any(on for _, on in seen)   # every forward of the W2 ensemble and of PGD in float32
    # on a GPU too: float32 for every measurement unless asked for, bf16 for the training step
    assert Compute.resolve("cuda", EvaluateConfig().amp).amp_dtype is None
    assert Compute.resolve("cuda", FinetuneConfig().eval_amp).amp_dtype is None
    assert Compute.resolve("cuda", FinetuneConfig().amp).amp_dtype == torch.bfloat16
    assert Compute.resolve("cuda", EvaluateConfig(amp="bf16").amp).amp_dtype == torch.bfloat16
