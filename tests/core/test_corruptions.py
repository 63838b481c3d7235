"""Common corruptions (core.engine.evaluation.corruptions) on real small data: the config's
errors, the sizes at which a type is skipped (and that it is listed with its reason), seeded
determinism, the mCE arithmetic, the evaluate recipe's block and chart, and a Fashion-MNIST
fine-tune at a large δ against its input under Gaussian noise."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from core.engine.config import CORRUPTION_TYPES, CorruptionSpec, EvaluateConfig, FinetuneConfig
from core.engine.evaluation.corruptions import (
    CorruptionResult,
    corrupt,
    corruption_summary,
    measure_corruptions,
    skip_reason,
    versus_input,
)
from core.engine.evaluation.invariants import ReportInvariantError, check_report
from core.engine.hooks import Hooks
from core.engine.recipes.evaluate import evaluate

# cheap subsets: a noise (numpy's RNG), impulse noise (skimage's, seeded through it), frost (a
# random crop of the package's pictures), and two types that do not apply to every severity at 8×8
CHEAP = {"types": ["gaussian_noise", "impulse_noise", "frost", "defocus_blur", "glass_blur"], "severities": [1, 5]}


# ------------------------------------------------------------------------------ the config
def test_the_field_takes_true_a_list_or_an_object_and_names_what_is_wrong() -> None:
    assert EvaluateConfig().corruption_spec is None and EvaluateConfig(corruptions=False).corruption_spec is None
    every = EvaluateConfig(corruptions=True).corruption_spec
    assert every is not None and every.types == list(CORRUPTION_TYPES) and every.severities == [1, 2, 3, 4, 5]
    assert len(every.cells) == 75
    picked = FinetuneConfig(corruptions=["noise", "fog", "gaussian_noise"]).corruption_spec
    assert picked is not None and picked.types == ["gaussian_noise", "shot_noise", "impulse_noise", "fog"]
    spec = EvaluateConfig(corruptions={"types": ["Motion-Blur"], "severities": [5, 1, 5]}).corruption_spec
    assert spec is not None and spec.cells == [("motion_blur", 1), ("motion_blur", 5)]
    # a dumped config validates again to the same spec (the job stores it)
    again = EvaluateConfig.model_validate(EvaluateConfig(corruptions=True).model_dump(mode="json"))
    assert again.corruption_spec == every
    cases = [({"types": ["gausian_noise"]}, "unknown corruption type 'gausian_noise' (did you mean 'gaussian_noise'"),
             (["snowy"], "did you mean 'snow'"), ({"severities": [0]}, "whole numbers from 1 to 5, got 0"),
             ({"severities": [6]}, "got 6"), ({"types": []}, "at least 1 item"), ({"level": 3}, "level"),
             ("noise", "a list of corruption types"), (3, "true or false")]
    for value, words in cases:
        with pytest.raises(ValidationError) as caught:
            EvaluateConfig(corruptions=value)
        errors = caught.value.errors()
        assert len(errors) == 1 and errors[0]["loc"] == ("corruptions",) and words in errors[0]["msg"], errors


# ------------------------------------------------------------------------------ sizes and channels
def test_which_corruptions_apply_at_the_sizes_of_digits_fashion_mnist_and_cifar() -> None:
    def skipped(h: int, w: int, c: int = 1) -> set[tuple[str, int]]:
        return {(t, s) for t in CORRUPTION_TYPES for s in range(1, 6) if skip_reason(t, s, h, w, c)}

    assert skipped(8, 8) == ({("motion_blur", s) for s in range(1, 6)} | {("snow", s) for s in range(1, 6)}
                             | {("defocus_blur", s) for s in range(2, 6)} | {("glass_blur", 5)})
    assert skipped(28, 28) == {("motion_blur", s) for s in range(2, 6)}
    assert skipped(32, 32, 3) == {("motion_blur", 5)}
    assert skipped(224, 224, 3) == set()
    assert len(skipped(32, 32, 4)) == 75 and "not 4 channels" in str(skip_reason("fog", 1, 32, 32, 4))
    assert "41 px long, longer than the 32×32 image" in str(skip_reason("motion_blur", 5, 32, 32, 3))


def test_gray_and_rgb_images_keep_their_size_channels_and_the_global_rng() -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 1, 8, 8), dtype=np.uint8)
    rgb = rng.integers(0, 256, (2, 3, 28, 20), dtype=np.uint8)
    np.random.seed(123)
    state = np.random.get_state()
    for images in (gray, rgb):
        for name in ("gaussian_noise", "frost", "jpeg_compression", "pixelate", "elastic_transform"):
            out = corrupt(images, name, 3, seed=0, image_ids=range(len(images)))
            assert out.shape == images.shape and out.dtype == np.uint8 and (out != images).any(), name
    after = np.random.get_state()
    assert after[0] == state[0] and (after[1] == state[1]).all() and after[2:] == state[2:]
    # an image's corruption depends on its own id only, not on the others in the call
    one = corrupt(gray[1:2], "gaussian_noise", 3, seed=0, image_ids=[1])
    assert (one[0] == corrupt(gray, "gaussian_noise", 3, seed=0, image_ids=[0, 1, 2])[1]).all()


# ------------------------------------------------------------------------------ measuring on digits
@pytest.fixture(scope="module")
def measured(digits_small_cnn):
    model, data = digits_small_cnn
    idx = torch.arange(150)
    spec = CorruptionSpec.model_validate(CHEAP)
    return {name: measure_corruptions([model.eval()], data.test_x[idx], data.test_y[idx], spec, seed=seed)
            for name, seed in (("first", 0), ("again", 0), ("other", 1))}


def test_the_same_seed_gives_the_same_numbers_and_another_seed_other_ones(measured) -> None:
    first, again, other = (measured[k][0].to_dict() for k in ("first", "again", "other"))
    assert json.dumps(first) == json.dumps(again)
    # the same images (the clean accuracy), other corrupted copies: a noise cell's number moves
    assert first["clean_accuracy"] == other["clean_accuracy"]
    noise = [(a["accuracy"], b["accuracy"]) for a, b in zip(first["rows"], other["rows"], strict=True)
             if a["family"] == "noise"]
    assert any(a != b for a, b in noise), noise


def test_every_cell_is_measured_or_skipped_with_its_reason(measured) -> None:
    block = measured["first"][0].to_dict()
    rows = {(r["type"], r["severity"]) for r in block["rows"]}
    skipped = {(r["type"], r["severity"]): r["reason"] for r in block["skipped"]}
    assert set(skipped) == {("defocus_blur", 5), ("glass_blur", 5)}
    assert "wider than the 8×8 image" in skipped[("defocus_blur", 5)] and "no pixel moves" in skipped[("glass_blur", 5)]
    assert rows | set(skipped) == {(t, s) for t in CHEAP["types"] for s in CHEAP["severities"]}
    assert block["cells_measured"] == 8 and block["cells_asked"] == 10
    for row in block["rows"]:
        lo, hi = row["ci95"]
        assert row["n"] == 150 and lo <= row["accuracy"] <= hi
    accuracies = [r["accuracy"] for r in block["rows"]]
    assert block["mean_accuracy"] == pytest.approx(np.mean(accuracies))
    lo, hi = block["mean_accuracy_ci95"]
    assert lo <= block["mean_accuracy"] <= hi
    gauss = next(t for t in block["per_type"] if t["type"] == "gaussian_noise")
    assert gauss["severities"] == [1, 5] and gauss["accuracy"] == pytest.approx(
        np.mean([r["accuracy"] for r in block["rows"] if r["type"] == "gaussian_noise"]))
    # the report check refuses a block that dropped a cell
    check_report({"corruptions": block})
    dropped = {**block, "skipped": block["skipped"][:1]}
    with pytest.raises(ReportInvariantError, match="neither measured nor skipped"):
        check_report({"corruptions": dropped})


def test_mce_against_the_input_model_by_hand() -> None:
    spec = CorruptionSpec(types=["gaussian_noise", "fog"], severities=[1, 2])
    n = 10

    def result(clean: int, hits: dict[tuple[str, int], int]) -> CorruptionResult:
        return CorruptionResult(spec, 0, (1, 8, 8), np.arange(n) < clean,
                                {cell: np.arange(n) < k for cell, k in hits.items()})

    before = result(9, {("gaussian_noise", 1): 6, ("gaussian_noise", 2): 4, ("fog", 1): 8, ("fog", 2): 7})
    after = result(8, {("gaussian_noise", 1): 7, ("gaussian_noise", 2): 7, ("fog", 1): 6, ("fog", 2): 6})
    vs = versus_input(before, after)
    ce = {t["type"]: t for t in vs["per_type"]}
    # CE = Σ errors after / Σ errors before; relative CE = Σ (E − E_clean) after / before
    assert ce["gaussian_noise"]["ce"] == pytest.approx((3 + 3) / (4 + 6))
    assert ce["fog"]["ce"] == pytest.approx((4 + 4) / (2 + 3))
    assert vs["mce"] == pytest.approx(((6 / 10) + (8 / 5)) / 2)
    assert ce["gaussian_noise"]["relative_ce"] == pytest.approx((1 + 1) / (3 + 5))
    assert ce["fog"]["relative_ce"] == pytest.approx((2 + 2) / (1 + 2))
    assert vs["mean_accuracy_change"] == pytest.approx((26 - 25) / 40)
    lo, hi = vs["mce_ci95"]
    assert lo <= vs["mce"] <= hi
    assert versus_input(before, before)["mce"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------ the recipes
def test_an_evaluation_reports_the_block_its_summary_and_a_chart(digits_small_cnn) -> None:
    model, data = digits_small_cnn
    config = EvaluateConfig(evaluation="quick", wpgd_steps=3, pgd_steps=2, n_examples=60, audit=False,
                            corruptions={**CHEAP, "types": ["gaussian_noise", "motion_blur"]})
    warned: list[str] = []
    report = evaluate(config, model, data, Hooks(warn=lambda message, _: warned.append(message)))
    out = report.to_dict()
    block = out["corruptions"]
    assert block["n_examples"] == 60 and block["image_shape"] == [1, 8, 8]
    assert [r["type"] for r in block["skipped"]] == ["motion_blur", "motion_blur"]
    assert out["summary"]["mean_corruption_accuracy"] == block["mean_accuracy"]
    assert any("motion_blur (severities 1, 5)" in w for w in warned) and warned[-1] in out["warnings"]
    assert "versus_input" not in block          # an evaluation has no baseline model
    assert report.plot_png().startswith(b"\x89PNG")
    # the helper the sweep calls gives the same numbers on the same images, and a baseline's mCE
    summary = corruption_summary(model, data, {**CHEAP, "types": ["gaussian_noise"]}, n_examples=60, seed=0,
                                 baseline=model)
    assert summary["rows"] == [r for r in block["rows"] if r["type"] == "gaussian_noise"]
    assert summary["versus_input"]["mce"] == pytest.approx(1.0)


@pytest.mark.slow
def test_a_fine_tune_at_a_large_delta_degrades_less_under_gaussian_noise(tmp_path) -> None:
    """Fashion-MNIST, the zoo's small CNN trained normally, then W-TRADES at δ = 0.15 (about 4.7
    times the default 8/255) for one epoch on 400 images. Measured over seeds 0-3 (docs/corruptions.md):
    where a checkpoint came back (seeds 0, 2), the accuracy at Gaussian noise severity 5 rose
    (0.39 → 0.49, 0.33 → 0.55) and the relative mCE was far below 1 (0.20, 0.03), but the mean over
    the five severities fell in one seed and rose in the other, neither significantly (the clean
    accuracy fell too). So this asserts what held, not a mean gain."""
    from core.engine.data.datasets import load_dataset
    from core.engine.recipes.finetune import finetune
    from core.engine.recipes.standard import train_standard
    from core.engine.zoo import create_model

    data = load_dataset("fashion-mnist", data_dir=tmp_path)
    subset = dataclasses.replace(data, train_x=data.train_x[:1000], train_y=data.train_y[:1000])
    torch.manual_seed(0)
    model = train_standard(create_model("small-cnn", num_classes=10, in_channels=1, image_size=28,
                                        dataset="fashion-mnist"), subset, epochs=2, seed=0)
    config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": 0.15}, train_examples=400, test_examples=150,
                            epochs=1, validation_examples=100, evaluation="quick", test_wpgd_steps=5,
                            test_pgd_steps=3, eval_wpgd_steps=5, eval_pgd_steps=3, attack_steps=3, seed=0,
                            selection={"max_clean_drop": None}, corruptions=["gaussian_noise"])
    result = finetune(config, model, data, device="cpu")
    assert result.best_epoch == 1
    before, after = result.before["corruptions"], result.after["corruptions"]
    assert before["n_examples"] == after["n_examples"] == 150 and not after["skipped"]
    severe = [next(r["accuracy"] for r in block["rows"] if r["severity"] == 5) for block in (before, after)]
    assert severe[1] > severe[0], severe
    vs = after["versus_input"]
    assert vs["relative_mce"] < 1.0, vs
    assert result.after["corruption_mce"] == vs["mce"]
    assert result.plot_png().startswith(b"\x89PNG")
    check_report(result.report)
