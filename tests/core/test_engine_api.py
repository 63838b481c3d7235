"""robustify.engine (core/engine/api.py): the recipes on a live nn.Module and tensors or a DataLoader,
returning the service's report structure. Digits and the zoo's small CNN (tests/core/conftest.py)."""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import robustify
from core.engine.recipes.evaluate import EvaluationReport
from robustify.engine import FinetuneOutput, evaluate, finetune, image_data

# Cheap attacks: a few seconds on one loaded core; every number is still the recipe's own.
QUICK_EVAL: dict[str, Any] = {"evaluation": "quick", "wpgd_steps": 5, "pgd_steps": 3, "linf_attacks": ["pgd"],
                              "audit": False}
# The e2e suite's tiny W-TRADES recipe (tests/e2e/conftest.py's TINY), measured with the quick preset.
TINY_FINETUNE: dict[str, Any] = {
    "epochs": 4, "batch_size": 96, "lr": 0.01, "beta": 3.0, "attack_steps": 3, "validation_examples": 200,
    "eval_wpgd_steps": 5, "eval_pgd_steps": 3, "test_wpgd_steps": 10, "test_pgd_steps": 3, "budget_subset": 256,
    "seed": 1, "evaluation": "quick"}
DELTA = 0.1


def _float_test_split(data: Any, n: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    return data.test_x[:n].float() / 255.0, data.test_y[:n]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def _check_w2_below_pointwise(block: dict[str, Any]) -> None:
    assert 0.0 <= block["w2_robust_accuracy"] <= block["linf_robust_accuracy"] <= block["clean_accuracy"] <= 1.0, block


@pytest.fixture(scope="module")
def evaluated(digits_small_cnn: Any) -> tuple[nn.Module, dict[str, Any]]:
    model, data = digits_small_cnn
    original = copy.deepcopy(model)
    report = evaluate(model, _float_test_split(data), threat="w2-linf", delta=DELTA, **QUICK_EVAL)
    assert _same_weights(model, original) and not model.training   # the module passed in is left alone
    return model, report


def test_evaluate_on_tensors_is_the_services_report(evaluated: tuple[nn.Module, dict[str, Any]]) -> None:
    _, report = evaluated
    summary = report["summary"]
    # report.json of an evaluation job: the recipe's report, its fields and its summary
    assert report["type"] == "evaluate" and set(report) <= {*EvaluationReport.__dataclass_fields__, "type", "summary"}
    assert {"summary", "w2", "pointwise", "clean", "per_class", "confusion_matrix", "provenance"} <= set(report)
    assert summary["n_examples"] == 120 and summary["delta"] == DELTA and summary["threat_model"] == "w2-linf"
    _check_w2_below_pointwise(summary)
    assert summary["clean_accuracy"] > 0.5           # a trained model, evaluated on its own kind of images
    for row in report["w2"]:                         # W2 <= l-inf at every radius, as the reports guarantee
        same = [p for p in report["pointwise"] if p["delta"] == row["delta"]]
        assert same and row["robust_accuracy"] <= min(p["robust_accuracy"] for p in same)
    lo, hi = summary["clean_accuracy_ci95"]
    assert lo <= summary["clean_accuracy"] <= hi
    # the SDK reads it as it reads a job's report
    outcome = robustify.Outcome.from_report(report)
    assert outcome.summary is not None and outcome.summary.w2 is not None
    assert outcome.summary.w2.accuracy == summary["w2_robust_accuracy"] and outcome.summary.w2.n == 120


def test_a_dataloader_uint8_images_and_tensors_give_the_same_numbers(
        digits_small_cnn: Any, evaluated: tuple[nn.Module, dict[str, Any]]) -> None:
    model, data = digits_small_cnn
    x, y = _float_test_split(data)
    loader = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=False)
    from_loader = evaluate(model, loader, delta=DELTA, **QUICK_EVAL)
    from_uint8 = evaluate(model, (data.test_x[:120].numpy(), data.test_y[:120].numpy()), delta=DELTA, **QUICK_EVAL)
    expected = evaluated[1]["summary"]
    for report in (from_loader, from_uint8):
        assert report["summary"] == expected


def test_a_normalised_model_takes_its_mean_and_std(digits_small_cnn: Any,
                                                   evaluated: tuple[nn.Module, dict[str, Any]]) -> None:
    model, data = digits_small_cnn
    mean, std = 0.3, 0.4

    class TrainedOnNormalised(nn.Module):    # what a model trained behind transforms.Normalize expects
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(z * std + mean)
            return out

    normalised = TrainedOnNormalised().eval()
    report = evaluate(normalised, _float_test_split(data), delta=DELTA, input_mean=[mean], input_std=[std],
                      **QUICK_EVAL)
    expected = evaluated[1]["summary"]
    assert report["summary"]["clean_accuracy"] == expected["clean_accuracy"]
    assert report["summary"]["w2_robust_accuracy"] == pytest.approx(expected["w2_robust_accuracy"], abs=0.02)
    # normalised images handed over as pixels are refused, naming the cure
    x, y = _float_test_split(data)
    with pytest.raises(ValueError, match="input_mean"):
        evaluate(normalised, ((x - mean) / std, y), delta=DELTA, **QUICK_EVAL)


def test_bad_inputs_are_refused_with_the_reason(digits_small_cnn: Any) -> None:
    model, data = digits_small_cnn
    x, y = _float_test_split(data)
    with pytest.raises(ValueError, match="model returns 10 logits"):
        evaluate(model, (x, y + 10), **QUICK_EVAL)
    with pytest.raises(TypeError, match="labels must be integers"):
        evaluate(model, (x, y.float()), **QUICK_EVAL)
    with pytest.raises(ValueError, match="no test data"):
        image_data(data, (x, y))


@pytest.fixture(scope="module")
def briefly_trained(digits_small_cnn: Any) -> nn.Module:
    """The small CNN after 3 epochs of plain training (the e2e suite's upload), which TINY_FINETUNE
    improves: W2 0.38 -> 0.50 on the test split, best epoch 3."""
    from core.engine.recipes.standard import train_standard
    from robustify.engine import create_model

    _, data = digits_small_cnn
    torch.manual_seed(0)
    return train_standard(create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, dataset="digits"),
                          data, epochs=3, seed=0)


def test_finetune_returns_a_changed_module_and_the_jobs_report(digits_small_cnn: Any, briefly_trained: nn.Module
                                                              ) -> None:
    _, data = digits_small_cnn
    model = briefly_trained
    original = copy.deepcopy(model)
    test = (data.test_x.float() / 255.0, data.test_y)
    seen: list[float] = []
    out = finetune(model, (data.train_x, data.train_y), test_data=test, delta=DELTA,
                   progress=lambda fraction, phase, metrics: seen.append(fraction), **TINY_FINETUNE)
    assert isinstance(out, FinetuneOutput)
    tuned, report = out
    assert _same_weights(model, original)                    # the input is not touched
    assert report["type"] == "finetune" and report["epochs_completed"] == 4 and len(report["history"]) == 4
    assert report["best_epoch"] >= 1 and not _same_weights(tuned, original), report["verdict_text"]
    assert not tuned.training and seen and seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    for block in (report["before"], report["after"]):
        assert block["delta"] == DELTA and block["n_examples"] == len(data.test_y)
        _check_w2_below_pointwise(block)
    assert report["verdict"] in ("improved", "no_significant_change", "improved_with_clean_drop",
                                 "improved_with_class_collapse", "improved_but_audit_failed")
    assert report["improved"] == (report["verdict"] == "improved")
    # the returned module is the checkpoint the report measured: its clean accuracy on the test images
    with torch.no_grad():
        clean = int((tuned.cpu()(test[0]).argmax(1) == test[1]).sum()) / len(test[1])
    assert clean == pytest.approx(report["after"]["clean_accuracy"], abs=1e-9)
    assert report["provenance"]["examples"]["test"] == len(data.test_y)
