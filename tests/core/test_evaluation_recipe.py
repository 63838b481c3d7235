"""The evaluate recipe on real digits with the zoo's small CNN: presets, intervals, the audit,
per-class numbers, a stratified sample, and W2 ≤ pointwise on every report."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from core.engine.config import EvaluateConfig
from core.engine.evaluation.ensemble import w2_ensemble
from core.engine.hooks import Hooks
from core.engine.recipes.evaluate import evaluate
from core.engine.threats import Threat
from core.engine.zoo import create_model
from tests.report_checks import assert_w2_not_above_pointwise

DELTA = 0.1


def _fresh(digits_small_cnn) -> torch.nn.Module:
    base, _ = digits_small_cnn
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    model.load_state_dict({k: v.clone() for k, v in base.state_dict().items()})
    return model


def _has_interval(row: dict, key: str = "robust_accuracy") -> None:
    lo, hi = row["ci95"]
    assert row["n"] > 0 and 0.0 <= lo <= row[key] <= hi <= 1.0, row


def test_report_curve_intervals_audit_per_class_and_w2_below_pointwise(digits_small_cnn) -> None:
    _, data = digits_small_cnn
    config = EvaluateConfig(threat_model={"kind": "w2-linf", "delta": 4 / 255}, evaluation="quick",
                            deltas=[2 / 255, 8 / 255, 24 / 255], wpgd_steps=20, pgd_steps=10, n_examples=200)
    phases: list[str] = []
    report = evaluate(config, _fresh(digits_small_cnn), data, Hooks(progress=lambda f, p, m: phases.append(p)))
    data_ = report.to_dict()
    json.dumps(data_)   # JSON-able
    assert assert_w2_not_above_pointwise(data_) == 4   # three radii and the summary
    w2 = [row["robust_accuracy"] for row in report.w2]
    assert w2 == sorted(w2, reverse=True) and w2[-1] < w2[0]
    for row in report.w2:
        _has_interval(row)
        assert row["threat"] == "w2-linf" and row["evaluation"] == "quick" and isinstance(row["converged"], bool)
        assert [a["attack"] for a in row["attacks"]] == ["w-pgd-redlr", "w-pgd-ce"]
        assert row["members"][0]["attack"] == "pgd (linf ball)"
        for a in row["attacks"] + row["members"]:
            _has_interval(a)
        assert row["robust_to_clean_ratio"] == pytest.approx(row["robust_accuracy"] / report.clean_accuracy)
        assert row["first_order_estimate"] == pytest.approx(row["loss_clean"] + row["delta"] * row["sensitivity"])
    for row in report.pointwise:
        _has_interval(row)
    summary = report.summary   # δ = 4/255 is not on the curve: the headline is the largest radius, and says so
    assert summary["w2_robust_accuracy"] == w2[2] and summary["delta"] == 24 / 255
    assert summary["delta_source"] == "largest_radius" and summary["evaluation"] == "quick"
    for key in ("clean_accuracy", "w2_robust_accuracy", "linf_robust_accuracy"):
        lo, hi = summary[f"{key}_ci95"]
        assert lo <= summary[key] <= hi
    assert data_["provenance"]["examples"] == {"test": 200}
    assert data_["provenance"]["evaluation"]["preset"] == "quick"
    assert data_["provenance"]["evaluation"]["pointwise_attacks"] == ["pgd"]
    assert data_["provenance"]["evaluation_precision"] == "float32"
    assert data_["provenance"]["test_sample"]["method"] == "stratified random sample"
    # the audit, per class and the confusion matrix at the headline radius
    assert {c["check"] for c in report.audit} >= {"radius", "steps", "random", "gradients"}
    assert all(c["status"] in ("pass", "warn", "fail") and c["detail"] for c in report.audit)
    assert summary["audit"] in ("pass", "warn", "fail")
    assert len(report.per_class) == 10 and sum(r["n"] for r in report.per_class) == 200
    matrix = report.confusion_matrix
    assert sum(map(sum, matrix)) == 200
    assert sum(matrix[c][c] for c in range(10)) / 200 == pytest.approx(report.clean_accuracy)
    for r in report.per_class:
        assert r["n"] == sum(matrix[r["class"]])
        assert r["clean_accuracy"] == pytest.approx(matrix[r["class"]][r["class"]] / r["n"])
        assert r["w2_robust_accuracy"] <= r["clean_accuracy"]
    assert any(p.startswith("w-pgd") for p in phases) and phases[-1] == "done"
    assert report.plot_png().startswith(b"\x89PNG")


def test_pointwise_rows_do_not_depend_on_the_headline_radius(digits_small_cnn) -> None:
    _, data = digits_small_cnn
    common = dict(deltas=[0.03, DELTA], wpgd_steps=5, pgd_steps=10, n_examples=120, evaluation="quick", audit=False)
    small = evaluate(EvaluateConfig(threat_model={"kind": "w2-linf", "delta": 0.03}, **common),
                     _fresh(digits_small_cnn), data)
    large = evaluate(EvaluateConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, **common),
                     _fresh(digits_small_cnn), data)
    assert [p["robust_accuracy"] for p in small.pointwise] == [p["robust_accuracy"] for p in large.pointwise]
    assert small.summary["delta"] == 0.03 and large.summary["delta"] == DELTA
    for report in (small, large):
        assert_w2_not_above_pointwise(report.to_dict())


def test_an_attack_that_hits_its_step_cap_says_it_had_not_converged(digits_small_cnn) -> None:
    model, data = digits_small_cnn
    x = data.test_x[:200].float() / 255
    y = data.test_y[:200]
    result = w2_ensemble(model.eval(), x, y, Threat("w2-linf", DELTA), preset="quick", steps=2, step_ratio=0.1,
                         patience=2, cap=4)
    assert not result.converged and all(a["stopped_by"] == "cap" for a in result.to_dict()["attacks"])
    warnings = result.warnings()
    assert len(warnings) == 2 and all("had not converged" in w and "step cap of 4" in w for w in warnings)


def test_the_demo_model_converges_under_the_standard_preset(digits_small_cnn) -> None:
    """The demo's starting model (small-cnn, 5 epochs on digits) at the demo's δ on the whole test
    split: every attack stops on its patience, so the report has no "not converged" warning."""
    _, data = digits_small_cnn
    config = EvaluateConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, linf_attacks=[], audit=False)
    report = evaluate(config, _fresh(digits_small_cnn), data)
    row = report.w2[0]
    assert row["n"] == data.test_y.shape[0] and row["evaluation"] == "standard"
    assert [a["stopped_by"] for a in row["attacks"]] == ["patience"] * 3, row["attacks"]
    assert row["converged"] and not report.warnings
    assert row["robust_accuracy"] == min(a["robust_accuracy"] for a in row["attacks"])


def test_a_sample_of_a_class_sorted_split_holds_every_class(digits_small_cnn) -> None:
    """Test images stored class by class (as an image-folder upload is): n_examples below the
    split's size is a stratified sample, so every class is evaluated."""
    _, data = digits_small_cnn
    order = torch.argsort(data.test_y, stable=True)
    sorted_data = dataclasses.replace(data, test_x=data.test_x[order], test_y=data.test_y[order])
    config = EvaluateConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, n_examples=50, evaluation="quick",
                            wpgd_steps=5, pgd_steps=3, audit=False)
    report = evaluate(config, _fresh(digits_small_cnn), sorted_data)
    assert [r["n"] > 0 for r in report.per_class] == [True] * 10
    sample = report.provenance["test_sample"]
    assert sample["n"] == 50 and sample["classes_missing"] == [] and min(sample["per_class"]) >= 4
    again = evaluate(config, _fresh(digits_small_cnn), sorted_data)   # seeded: the same images
    assert again.provenance["test_sample"]["indices_sha256"] == sample["indices_sha256"]
    assert again.to_dict()["w2"] == report.to_dict()["w2"]


def test_the_cpu_standard_pointwise_attack_is_apgd_and_autoattack_reports_each_attack(digits_small_cnn) -> None:
    _, data = digits_small_cnn
    config = EvaluateConfig(threat_model={"kind": "w2-linf", "delta": DELTA}, n_examples=24, wpgd_steps=5,
                            linf_attacks=["pgd", "autoattack"], pgd_steps=10, batch_size=24, audit=False,
                            evaluation="quick")
    phases: list[str] = []
    report = evaluate(config, _fresh(digits_small_cnn), data, Hooks(progress=lambda f, p, m: phases.append(p)))
    for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
        assert f"autoattack: {name}" in phases
    aa = next(r for r in report.pointwise if r["attack"] == "autoattack-standard")
    pgd_row = next(r for r in report.pointwise if r["attack"] == "pgd")
    assert aa["robust_accuracy"] <= pgd_row["robust_accuracy"] + 1e-9
    assert list(aa["accuracy_after"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert report.summary["linf_robust_accuracy"] == aa["robust_accuracy"]
    assert [m["attack"] for m in report.w2[0]["members"]] == ["pgd (linf ball)", "autoattack-standard (linf ball)"]
    assert_w2_not_above_pointwise(report.to_dict())
    default = evaluate(config.model_copy(update={"linf_attacks": None, "evaluation": "standard"}),
                       _fresh(digits_small_cnn), data,
                       device="cpu")
    assert [p["attack"] for p in default.pointwise] == ["apgd-ce+apgd-t"]
    assert default.summary["linf_attack"] == "apgd-ce+apgd-t"
    assert default.provenance["evaluation"]["pointwise_attacks"] == ["apgd"]
    assert_w2_not_above_pointwise(default.to_dict())
