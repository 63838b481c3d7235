"""The job estimate's pass count and its combination with the workers' calibrations
(core/engine/estimate.py): torch-free arithmetic, checked against the recipes' own constants."""
from __future__ import annotations

import pytest

from core.engine.config import EvaluateConfig, FinetuneConfig
from core.engine.defaults import resolve_finetune
from core.engine.estimate import (
    BASIS_MEASURED,
    BASIS_REFERENCE,
    BASIS_SCALED,
    DEFAULT_OVERHEAD_SECONDS,
    PRESET_FACTS,
    REFERENCE,
    WorkerCalibration,
    combine,
    evaluate_passes,
    finetune_passes,
    kind_key,
)

THREAT = {"kind": "w2-linf", "delta": 0.1}
TINY = {"epochs": 4, "batch_size": 96, "attack_steps": 3, "validation_examples": 200, "eval_wpgd_steps": 5,
        "eval_pgd_steps": 3, "test_wpgd_steps": 10, "test_pgd_steps": 3, "budget_subset": 256, "threat_model": THREAT}


def tiny(**over: object) -> FinetuneConfig:
    return resolve_finetune(FinetuneConfig.model_validate({**TINY, **over}), 1438)


def test_the_preset_facts_are_the_ensembles() -> None:
    from core.engine.attacks.autoattack import CPU_ATTACKS, STANDARD_ATTACKS
    from core.engine.evaluation import audit
    from core.engine.evaluation.ensemble import PRESETS

    assert set(PRESET_FACTS) == set(PRESETS)
    for name, spec in PRESETS.items():
        facts = PRESET_FACTS[name]
        assert (facts["attacks"], facts["patience"], facts["cap"]) == (len(spec.attacks), spec.patience, spec.cap)
        assert facts["pointwise"] == {"cuda": spec.pointwise_cuda, "cpu": spec.pointwise_cpu}
    assert audit.RANDOM_DRAWS == 8 and CPU_ATTACKS == ("apgd-ce", "apgd-t") and len(STANDARD_ATTACKS) == 4


def test_finetune_passes_follow_the_config() -> None:
    base = finetune_passes(tiny(), 1438, 359, "cpu")
    assert base["total"] == pytest.approx(sum(v for k, v in base.items() if k != "total"))
    # 1,438 images less 200 validation: 12 batches of 96 per epoch, each image K + 2 units
    assert base["training"] == 4 * 12 * 96 * (3 + 2)
    assert base["validation"] == pytest.approx(5 * 200 * (5 + 3 + 2 / 3))
    assert base["sensitivity"] == 256
    # more epochs: more training and validation, the same final evaluation
    longer = finetune_passes(tiny(epochs=8), 1438, 359, "cpu")
    assert longer["training"] == 2 * base["training"] and longer["total"] > base["total"]
    assert longer["final_evaluation"] == base["final_evaluation"]
    # fewer inner steps (the allocate schedule's one) cost less training
    fast = finetune_passes(tiny(attack_schedule="allocate", attack_steps=1), 1438, 359, "cpu")
    assert fast["training"] == pytest.approx(base["training"] * 3 / 5)
    # a test sample and the quick preset shrink the final evaluation; AutoAttack on a GPU costs more than APGD
    assert finetune_passes(tiny(test_examples=100), 1438, 359, "cpu")["final_evaluation"] < base["final_evaluation"]
    assert finetune_passes(tiny(evaluation="quick"), 1438, 359, "cpu")["final_evaluation"] < base["final_evaluation"]
    assert finetune_passes(tiny(), 1438, 359, "cuda")["final_evaluation"] > base["final_evaluation"]
    # train_examples limits what is sampled
    assert finetune_passes(tiny(train_examples=400), 1438, 359, "cpu")["training"] < base["training"]


def test_evaluate_passes_scale_with_images_and_radii() -> None:
    one = evaluate_passes(EvaluateConfig(threat_model=THREAT, n_examples=100), 359, "cpu")
    two = evaluate_passes(EvaluateConfig(threat_model=THREAT, n_examples=200, deltas=[0.05, 0.1]), 359, "cpu")
    assert two["w2_ensemble"] == pytest.approx(4 * one["w2_ensemble"])
    assert two["audit"] == pytest.approx(2 * one["audit"])        # the audit runs once, at the headline radius
    every = evaluate_passes(EvaluateConfig(threat_model=THREAT), 359, "cpu")
    assert every["w2_ensemble"] == pytest.approx(3.59 * one["w2_ensemble"])
    none = evaluate_passes(EvaluateConfig(threat_model=THREAT, n_examples=100, linf_attacks=[], audit=False), 359,
                           "cpu")
    assert none["pointwise"] == none["audit"] == 0 and none["total"] == one["w2_ensemble"]


def worker(name: str, device_class: str = "cpu", seconds: float | None = 1e-3, live: bool = True,
           kinds: dict | None = None, params: int = 50_000) -> WorkerCalibration:
    ref = {**REFERENCE["cpu"], "params": params}
    if seconds is not None:
        ref["seconds_per_unit"] = seconds
    return WorkerCalibration(name, live, device_class, ref, kinds or {})


def passes_of(total: float):
    return lambda device_type: {"training": total, "total": total}


def test_no_calibration_is_a_null_with_its_reason() -> None:
    out = combine(passes_of(1000), "small-cnn", [1, 8, 8], None, [worker("w", seconds=None)])
    assert out["devices"] == {} and "no worker has recorded a calibration" in out["reason"]
    assert out["kind"] == "small-cnn@1x8x8" and out["passes"] == {"cpu": {"training": 1000, "total": 1000}}


def test_a_measured_kind_wins_and_others_are_scaled() -> None:
    key = kind_key("small-cnn", [1, 8, 8])
    measured = {key: {"seconds_per_unit": 2e-4, "overhead_seconds": 3.0}}
    cpu_a = worker("a", kinds=measured)
    cpu_b = worker("b", seconds=2e-3)                      # half as fast, never ran the kind
    gpu = worker("g", device_class="cuda:H100", seconds=1e-5)
    out = combine(passes_of(10_000), "small-cnn", [1, 8, 8], 20_000, [cpu_a, cpu_b, gpu])
    cpu = out["devices"]["cpu"]
    assert cpu["basis"] == BASIS_MEASURED and cpu["workers_seen"] == 2
    # a: 3 + 10,000 × 2e-4 = 5; b: the kind's cost relative to a's reference (0.2) × b's reference
    assert cpu["range_seconds"] == [5.0, pytest.approx(3.0 + 10_000 * 0.2 * 2e-3)]
    assert cpu["seconds"] == pytest.approx((5.0 + 7.0) / 2)
    assert out["devices"]["cuda:H100"]["basis"] == BASIS_SCALED
    assert out["devices"]["cuda:H100"]["seconds"] == pytest.approx(3.0 + 10_000 * 0.2 * 1e-5, abs=0.05)
    # no kind anywhere: the reference, scaled by pixels × parameters^0.7
    fresh = combine(passes_of(10_000), "resnet", [3, 64, 64], 100_000, [worker("c")])["devices"]["cpu"]
    assert fresh["basis"] == BASIS_REFERENCE
    assert fresh["seconds"] == pytest.approx(DEFAULT_OVERHEAD_SECONDS + 10_000 * 1e-3 * 4 * 2 ** 0.7, abs=0.05)


def test_live_workers_count_and_stopped_ones_stand_in() -> None:
    gone = worker("old", live=False, seconds=1e-3)
    out = combine(passes_of(1000), "small-cnn", [3, 32, 32], 50_000, [gone])["devices"]["cpu"]
    assert out["workers_seen"] == 0 and out["workers_calibrated"] == 1 and out["seconds"] > 0
    fast, slow = worker("live", seconds=1e-4), worker("old", live=False, seconds=1.0)
    out = combine(passes_of(1000), "small-cnn", [3, 32, 32], 50_000, [fast, slow])["devices"]["cpu"]
    assert out["workers_seen"] == 1 and out["range_seconds"][1] < 10


def test_the_estimate_grows_with_epochs() -> None:
    cal = [worker("w")]
    times = [combine(lambda t, e=e: finetune_passes(tiny(epochs=e), 1438, 359, t), "small-cnn", [1, 8, 8], None,
                     cal)["devices"]["cpu"]["seconds"] for e in (1, 2, 4, 8)]
    assert times == sorted(times) and len(set(times)) == 4
