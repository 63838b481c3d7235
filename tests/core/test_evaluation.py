"""The evaluation engine on real digits: the W2 ensemble, intervals, the masking audit, per-class numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.engine.attacks import pgd, w_pgd
from core.engine.evaluation.audit import audit_status, masking_audit, transfer_check
from core.engine.evaluation.ensemble import (
    PRESETS,
    REDLR,
    Member,
    random_w2_start,
    w2_ensemble,
)
from core.engine.evaluation.intervals import (
    accuracy_stat,
    paired_change,
    significant_improvement,
    wilson_interval,
)
from core.engine.evaluation.perclass import collapsed_classes, confusion_matrix, per_class
from core.engine.evaluation.pointwise import pointwise_attack
from core.engine.threats import Threat
from tests.core.conftest import TinyCNN

DELTA = 0.1
THREAT = Threat("w2-linf", DELTA)


# --- intervals -----------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.03, 0.3, 0.85])
def test_wilson_intervals_cover_a_known_accuracy(p: float) -> None:
    """100 simulated test sets of 150 images with true accuracy p: at least 90 intervals hold p
    (the normal approximation fails this at p = 0.03)."""
    rng = np.random.default_rng(7)
    hits = rng.binomial(150, p, size=100)
    covered = sum(lo <= p <= hi for lo, hi in (wilson_interval(int(k), 150) for k in hits))
    assert covered >= 90, covered


def test_accuracy_stat_and_wilson_edges() -> None:
    stat = accuracy_stat(torch.tensor([True] * 30 + [False] * 10))
    assert stat["accuracy"] == 0.75 and stat["n"] == 40
    lo, hi = stat["ci95"]
    assert 0.58 < lo < 0.75 < hi < 0.87
    assert wilson_interval(0, 50)[0] == 0.0 and wilson_interval(0, 50)[1] > 0.0   # not a point at 0
    assert wilson_interval(50, 50)[1] == 1.0 and wilson_interval(50, 50)[0] < 1.0
    with pytest.raises(ValueError, match="correct must lie in"):
        wilson_interval(5, 4)


def test_paired_change_is_significant_only_when_its_interval_is_above_zero() -> None:
    before = torch.zeros(300, dtype=torch.bool)
    before[:150] = True
    after = before.clone()
    after[150:180] = True                       # 30 images gained
    after[:4] = False                           # 4 lost
    change = paired_change(before, after, seed=1)
    assert change["change"] == pytest.approx(26 / 300) and change["n"] == 300
    assert 0 < change["ci95"][0] < 26 / 300 < change["ci95"][1]
    assert significant_improvement(change) and "paired bootstrap" in change["method"]
    churn = before.clone()
    churn[150:160] = True
    churn[:10] = False                          # as many gained as lost: no change
    same = paired_change(before, churn, seed=1)
    assert same["change"] == 0.0 and same["ci95"][0] < 0 < same["ci95"][1]
    assert not significant_improvement(same)
    # pairing: the same +26 images spread over unrelated outcomes would give a wider interval
    assert change["ci95"][1] - change["ci95"][0] < 2 * 1.96 * np.sqrt(0.5 * 0.5 / 300 * 2)
    with pytest.raises(ValueError, match="same images"):
        paired_change(before, after[:10])


# --- the ensemble --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_set(digits):
    _, _, xte, yte = digits
    return xte[:300], yte[:300]


def test_ensemble_with_only_redlr_and_fixed_steps_is_the_reference_w_pgd(trained_tiny, test_set) -> None:
    x, y = test_set
    reference = w_pgd(trained_tiny, x, y, THREAT, steps=15, loss="redlr", batch_size=64)
    result = w2_ensemble(trained_tiny, x, y, THREAT, preset="standard", batch_size=64, steps=15,
                         attacks=[REDLR], adaptive=False)
    assert result.robust_accuracy == reference.robust_accuracy
    row = result.to_dict()
    assert row["accuracy_trajectory"] == reference.accuracy_trajectory and row["steps"] == 15
    assert row["attacks"][0]["steps"] == 15 and row["attacks"][0]["stopped_by"] == "steps"
    # the per-image outcome is the worst iterate's: its mean is the robust accuracy
    assert float(result.correct.float().mean()) == pytest.approx(reference.robust_accuracy)


def test_ensemble_is_at_most_each_attack_and_member_and_runs_to_convergence(trained_tiny, test_set) -> None:
    x, y = test_set
    point = pointwise_attack(trained_tiny, x, y, THREAT.pointwise, "pgd", batch_size=128, steps=10)
    result = w2_ensemble(trained_tiny, x, y, THREAT, preset="standard", batch_size=128, steps=20, seed=3,
                         members=[Member.of(point)])
    row = result.to_dict()
    names = [a["attack"] for a in row["attacks"]]
    assert names == ["w-pgd-redlr", "w-pgd-ce", "w-pgd-redlr-random-start"]
    singles = [a["robust_accuracy"] for a in row["attacks"] + row["members"]]
    assert row["robust_accuracy"] == min(singles) and row["n"] == 300
    assert row["members"][0]["robust_accuracy"] == pytest.approx(point.robust_accuracy)   # W2 ≤ l∞ by construction
    assert row["robust_accuracy"] <= point.robust_accuracy
    for a in row["attacks"]:   # adaptive: at least the nominal steps, stopped by patience below the cap
        assert 20 <= a["steps"] < PRESETS["standard"].cap and a["converged"] and a["stopped_by"] == "patience"
        lo, hi = a["ci95"]
        assert lo <= a["robust_accuracy"] <= hi
    # a fixed-step ReDLR run of the same nominal length is never stronger than the adaptive one
    fixed = w_pgd(trained_tiny, x, y, THREAT, steps=20, loss="redlr", batch_size=128)
    assert row["attacks"][0]["robust_accuracy"] <= fixed.robust_accuracy


def test_random_start_lies_in_the_ball_and_members_outside_are_refused(trained_tiny, test_set) -> None:
    x, y = test_set
    g = torch.Generator().manual_seed(0)
    start = random_w2_start(x, THREAT, g, 0.8)
    assert THREAT.distance(start, x) <= 0.8 * DELTA + 1e-6 and start.min() >= 0 and start.max() <= 1
    assert THREAT.distance(start, x) > 0.3 * DELTA
    with pytest.raises(ValueError, match="outside the W2 ball"):
        w2_ensemble(trained_tiny, x, y, THREAT, preset="quick", steps=2, adaptive=False,
                    members=[(x + 3 * DELTA).clamp(0, 1)])


def test_pgd_keeps_the_points_that_fooled_each_image(trained_tiny, test_set) -> None:
    x, y = test_set
    ball = THREAT.pointwise
    res = pgd(trained_tiny, x, y, ball, steps=5, batch_size=100, keep_adv=True,
              generator=torch.Generator().manual_seed(0))
    assert res.correct is not None and res.x_adv is not None
    assert (res.x_adv - x).abs().amax() <= DELTA + 1e-6
    fooled_there = trained_tiny(res.x_adv).argmax(1) != y
    assert bool((fooled_there | res.correct).all())          # every non-robust image is fooled at its point
    assert float(res.correct.float().mean()) == pytest.approx(res.robust_accuracy)


# --- masking ---------------------------------------------------------------------------------
class Saturated(torch.nn.Module):
    """The twin's logits ×1e4: the softmax saturates and the cross-entropy gradient vanishes."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 1e4


class Quantised(torch.nn.Module):
    """The twin on its input rounded to 4 levels, without a straight-through estimator: every
    input gradient is exactly zero."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 3) / 3)


def _audit(model, x, y, preset="quick", steps=20):
    result = w2_ensemble(model, x, y, THREAT, preset=preset, batch_size=150, steps=steps)
    point = pointwise_attack(model, x, y, THREAT.pointwise, "pgd", batch_size=150, steps=10)
    checks = masking_audit(model, x, y, THREAT, ensemble=result, compute=_cpu(), batch_size=150,
                           steps=steps, pointwise_accuracy=point.robust_accuracy)
    return result, {c["check"]: c for c in checks}


def _cpu():
    from core.engine.device import Compute

    return Compute.resolve("cpu", amp="off", channels_last=False)


def test_a_saturated_softmax_fails_the_audit_and_is_not_more_robust_than_its_twin(trained_tiny, test_set) -> None:
    x, y = test_set
    twin, twin_checks = _audit(trained_tiny, x, y)
    masked, checks = _audit(Saturated(trained_tiny).eval(), x, y)
    assert checks["gradients"]["status"] == "fail", checks["gradients"]
    assert audit_status(list(checks.values())) == "fail"
    assert twin_checks["gradients"]["status"] == "pass"
    assert masked.robust_accuracy <= twin.robust_accuracy + 2 / len(y)
    # what the ensemble's ReDLR sees through, the cross-entropy attack alone would have reported
    ce = next(o for o in masked.attacks if o.name == "w-pgd-ce")
    assert ce.robust_accuracy > masked.robust_accuracy + 0.2


def test_a_quantised_input_fails_the_audit(trained_tiny, test_set) -> None:
    x, y = test_set
    _, checks = _audit(Quantised(trained_tiny).eval(), x, y)
    assert checks["gradients"]["status"] == "fail" and "zero or non-finite" in checks["gradients"]["detail"]
    assert checks["radius"]["status"] != "pass" or checks["random"]["status"] != "pass"


@pytest.fixture(scope="module")
def adversarially_trained(digits) -> TinyCNN:
    """A TinyCNN trained with PGD-l∞ (δ = 0.1, 5 steps) on digits: an honest robust model."""
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    ball = THREAT.pointwise
    for _ in range(12):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 64):
            idx = perm[i:i + 64]
            model.eval()
            xa = ball.random_start(xtr[idx], g)
            for _ in range(5):
                xa = xa.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(F.cross_entropy(model(xa), ytr[idx]), xa)
                xa = ball.project(xa + 0.025 * grad.sign(), xtr[idx])
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(xa.detach()), ytr[idx]).backward()
            opt.step()
    return model.eval()


def test_an_honest_adversarially_trained_model_passes_the_audit(adversarially_trained, trained_tiny, test_set) -> None:
    x, y = test_set
    result, checks = _audit(adversarially_trained, x, y, preset="standard")
    assert {name: c["status"] for name, c in checks.items()} == dict.fromkeys(checks, "pass"), checks
    assert set(checks) == {"radius", "steps", "random", "agreement", "gradients", "members"}
    assert result.converged and not result.warnings()   # a robust model's attacks stop on their patience too
    # it is measurably more robust than the normally trained twin architecture
    normal = w2_ensemble(trained_tiny, x, y, THREAT, preset="standard", batch_size=150, steps=20)
    assert result.robust_accuracy > normal.robust_accuracy + 0.1
    # a fine-tune's transfer check: an attack crafted on the normal model is weaker on the robust one
    transfer = transfer_check(trained_tiny, adversarially_trained, x, y, THREAT, compute=_cpu(),
                              white_box_accuracy=result.robust_accuracy, steps=20)
    assert transfer["status"] == "pass", transfer


def test_transfer_check_fails_when_the_white_box_attack_is_blind(trained_tiny, test_set) -> None:
    """The quantised model hides its gradients; an attack crafted on its unquantised twin fools it."""
    x, y = test_set
    masked = Quantised(trained_tiny).eval()
    blind = w2_ensemble(masked, x, y, THREAT, preset="quick", steps=20)
    check = transfer_check(trained_tiny, masked, x, y, THREAT, compute=_cpu(),
                           white_box_accuracy=blind.robust_accuracy, steps=20)
    assert check["status"] == "fail", check


# --- per class -------------------------------------------------------------------------------
def test_per_class_rows_confusion_matrix_and_collapsed_classes() -> None:
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 0, 1, 1, 0, 2, 2, 2, 1])
    clean = pred == y
    rows = per_class(y, {"clean_accuracy": clean}, 4, ["a", "b", "c", "d"])
    assert [r["n"] for r in rows] == [3, 2, 4, 0] and rows[0]["name"] == "a"
    assert rows[0]["clean_accuracy"] == pytest.approx(2 / 3) and rows[3]["clean_accuracy"] is None
    assert rows[1]["clean_accuracy_ci95"][0] < 0.5 < rows[1]["clean_accuracy_ci95"][1]
    matrix = confusion_matrix(y, pred, 4)
    assert matrix[0] == [2, 1, 0, 0] and matrix[2] == [0, 1, 3, 0] and sum(map(sum, matrix)) == 9
    after = per_class(y, {"clean_accuracy": torch.tensor([1, 1, 1, 0, 0, 1, 1, 1, 1]).bool()}, 4)
    collapsed = collapsed_classes(rows, after, 0.3)
    assert [c["class"] for c in collapsed] == [1] and collapsed[0]["after"] == 0.0
