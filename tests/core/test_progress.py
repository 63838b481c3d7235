"""Progress people can read: every phase of a recipe reports as it goes (the epoch-0 validation, the
training steps, the per-epoch validation, the final evaluation's attacks, an evaluation's PGD),
shared out by the work, so that an ETA exists within the first tenth of each phase."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from core.engine.config import EvaluateConfig, FinetuneConfig
from core.engine.data.datasets import load_dataset
from core.engine.hooks import Eta, Hooks, Stages
from core.engine.recipes.evaluate import evaluate
from core.engine.recipes.finetune import finetune
from core.engine.recipes.standard import train_standard
from core.engine.zoo import create_model

THREAT = {"kind": "w2-linf", "delta": 0.1}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_dataset("digits", data_dir=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def model(digits: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return train_standard(create_model("small-cnn", num_classes=10, in_channels=1, image_size=8), digits,
                          epochs=2, seed=0)


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    fresh = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    fresh.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    return fresh


def test_a_finetune_reports_every_phase_step_by_step(model: torch.nn.Module, digits: Any) -> None:
    # the validation at its default steps (20 W-PGD, 10 PGD) on a small split: the epoch-0 validation,
    # which showed 0 % without an ETA for minutes, now moves after its first W-PGD step
    config = FinetuneConfig(threat_model=THREAT, epochs=2, train_examples=200, validation_examples=40,
                            test_examples=40, batch_size=50, attack_steps=1, test_wpgd_steps=4, test_pgd_steps=2,
                            evaluation="quick", seed=0)
    calls: list[tuple[float, str, dict[str, Any]]] = []
    result = finetune(config, _copy(model), digits, Hooks(progress=lambda f, p, m: calls.append((f, p, dict(m)))))
    assert not result.stopped
    fractions = [f for f, _, _ in calls]
    assert fractions == sorted(fractions) and fractions[0] >= 0.0 and fractions[-1] < 1.0

    # epoch 0: the input model's validation, then training; it moves step by step, not 0 → done
    first_train = next(i for i, (_, p, _) in enumerate(calls) if p == "train")
    epoch0 = [f for f, p, m in calls[:first_train] if p == "evaluate" and m.get("epoch") == 0]
    assert len(set(epoch0)) >= 20 + 10 and epoch0[0] == 0.0
    span = epoch0[-1] - epoch0[0]
    assert span > 0 and min(f for f in epoch0 if f > 0) - epoch0[0] <= 0.1 * span   # an ETA in its first 10 %
    # the training steps and each epoch's validation report inside their phase
    steps = [m["step"] for _, p, m in calls if p == "train" and m.get("epoch") == 1 and "step" in m]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3
    assert len({f for f, p, m in calls if p == "evaluate" and m.get("epoch") == 2}) >= 20 + 10

    # the final evaluation: each model's pointwise attack and W2 ensemble, the audit, step by step
    test_phases = [p for _, p, _ in calls if p.startswith("test: ")]
    for stage in ("test: input model: pointwise attack", "test: input model: W2 ensemble: clean δ=0.1",
                  "test: masking audit: radius", "test: masking audit: steps"):
        assert stage in test_phases, (stage, sorted(set(test_phases)))
    tested = [f for f, p, _ in calls if p.startswith("test: ")]
    assert len(set(tested)) >= 20 and tested[0] < tested[-1]
    # the worker's ETA (core.engine.hooks.Eta), one tick per report: there from the first step of the
    # epoch-0 validation on, through every later phase
    tick = iter(range(len(calls)))
    eta = Eta(clock=lambda: float(next(tick)))
    etas = [eta(f) for f in fractions]
    moved = next(i for i, f in enumerate(fractions) if f > 0)
    assert calls[moved][1] == "evaluate" and calls[moved][2]["epoch"] == 0
    assert all(e is not None and e >= 0 for e in etas[moved:])


def test_an_evaluation_reports_its_pgd_steps(model: torch.nn.Module, digits: Any) -> None:
    config = EvaluateConfig(threat_model=THREAT, n_examples=40, wpgd_steps=4, linf_attacks=["pgd"], pgd_steps=8,
                            evaluation="quick", audit=False)
    calls: list[tuple[float, str]] = []
    evaluate(config, _copy(model), digits, Hooks(progress=lambda f, p, m: calls.append((f, p))))
    pgd = [f for f, p in calls if p == "pgd δ=0.1"]
    assert len(pgd) >= 8 and pgd == sorted(pgd) and 0 < pgd[0] <= 0.125 * pgd[-1] + 1e-9
    assert [f for f, _ in calls] == sorted(f for f, _ in calls)


def test_stages_share_the_work_by_cost_and_the_eta_follows_the_rate() -> None:
    seen: list[tuple[float, str]] = []
    stages = Stages(lambda f, p: seen.append((f, p)), total=10)
    first = stages.stage(2, "cheap")
    first(0.5)
    second = stages.stage(8, "costly")
    second(0.25, "attack")              # a detail of the stage: "costly: attack"
    second(2.0)                                  # clamped to its stage
    assert [p for _, p in seen] == ["cheap", "cheap", "costly", "costly: attack", "costly"]
    assert [f for f, _ in seen] == pytest.approx([0.0, 0.1, 0.2, 0.4, 1.0])

    now = [100.0]
    eta = Eta(clock=lambda: now[0])
    assert eta(0.1) is None                      # the first report starts the clock
    now[0] = 110.0
    assert eta(0.1) is None                      # no progress yet: no estimate
    now[0] = 120.0
    assert eta(0.3) == pytest.approx(70.0)       # 0.2 in 20 s: 0.7 left takes 70 s
