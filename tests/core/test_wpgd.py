"""W-PGD, W-FGSM and PGD on a small CNN trained on real digits."""
from __future__ import annotations

import copy

import pytest
import torch

from core.engine.attacks import pgd, w_fgsm, w_pgd
from core.engine.losses import redlr
from core.engine.threats import Threat


def _reference_w_pgd(model, x, y, delta: float, steps: int, ratio: float, ground: str = "linf") -> list[float]:
    """algorithm.md's W-PGD written plainly (ReDLR; W2 with l∞ or l2 ground cost): whole set in one
    batch, a separate evaluation pass after every step, float64."""
    alpha = ratio * delta / steps
    x_adv = x.clone()
    accuracies = [float((model(x_adv).argmax(1) == y).double().mean())]
    for _ in range(steps):
        xa = x_adv.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(redlr(model(xa), y).sum(), xa)
        if ground == "linf":
            l1 = g.flatten(1).abs().sum(1)                              # ‖g_i‖_1
            h = g.sign() * l1[:, None, None, None]                      # h_i = sgn(g_i)·‖g_i‖_1
            big_n = torch.sqrt(torch.mean(h.flatten(1).abs().amax(1) ** 2))   # N = (mean ‖h_i‖_∞²)^½
        else:
            h = g                                                       # s = 2: h_i = g_i
            big_n = torch.sqrt(torch.mean(h.flatten(1).norm(dim=1) ** 2))
        cand = x_adv + alpha * h / big_n
        e = cand - x
        norms = e.flatten(1).abs().amax(1) if ground == "linf" else e.flatten(1).norm(dim=1)
        dist = torch.sqrt(torch.mean(norms ** 2))
        rho = min(1.0, delta / (float(dist) + 1e-12))
        if ground == "linf":
            bound = (rho * norms)[:, None, None, None]
            e = torch.maximum(torch.minimum(e, bound), -bound)
        else:
            e = rho * e
        x_adv = (x + e).clamp(0, 1).detach()
        with torch.no_grad():
            accuracies.append(float((model(x_adv).argmax(1) == y).double().mean()))
    return accuracies


@pytest.fixture(scope="module")
def model64(trained_tiny):
    return copy.deepcopy(trained_tiny).double().eval()


@pytest.fixture(scope="module")
def test_set64(digits):
    _, _, xte, yte = digits
    return xte.double(), yte


@pytest.mark.parametrize("delta", [2 / 255, 8 / 255, 24 / 255])
def test_fused_w_pgd_matches_plain_reference_step_by_step(model64, test_set64, delta: float) -> None:
    x, y = test_set64
    fused = w_pgd(model64, x, y, Threat("w2-linf", delta), steps=12, step_ratio=1.875, loss="redlr",
                  batch_size=97)   # batches that do not divide the set: normalisation must still be global
    ref = _reference_w_pgd(model64, x, y, delta, 12, 1.875)
    assert fused.accuracy_trajectory == pytest.approx(ref, abs=1e-12)
    assert fused.robust_accuracy == min(ref)
    assert fused.clean_accuracy == ref[0]
    assert fused.robust_accuracy < fused.clean_accuracy


@pytest.mark.parametrize("delta", [0.2, 0.8])
def test_fused_w_pgd_matches_plain_reference_with_l2_ground_cost(model64, test_set64, delta: float) -> None:
    x, y = test_set64
    fused = w_pgd(model64, x, y, Threat("w2-l2", delta), steps=10, batch_size=128)
    ref = _reference_w_pgd(model64, x, y, delta, 10, 1.875, ground="l2")
    assert fused.accuracy_trajectory == pytest.approx(ref, abs=1e-12)
    assert fused.robust_accuracy < fused.clean_accuracy


def test_w_pgd_result_invariants(model64, test_set64) -> None:
    x, y = test_set64
    delta = 8 / 255
    res = w_pgd(model64, x, y, Threat("w2-linf", delta), steps=20, keep_final=True)
    assert len(res.accuracy_trajectory) == 21 and res.steps == 20
    assert res.final_distance <= delta * (1 + 1e-9)
    assert float(res.x_final.min()) >= 0.0 and float(res.x_final.max()) <= 1.0
    assert res.robust_accuracy == min(res.accuracy_trajectory)
    assert res.accuracy_trajectory[res.worst_step] == res.robust_accuracy
    assert res.loss_max >= res.loss_clean
    assert res.first_order_estimate == pytest.approx(res.loss_clean + delta * res.sensitivity)
    assert res.sensitivity > 0
    # ReDLR: the attack raises the mean loss from V(0) < 0 towards 0
    assert res.loss_clean < res.loss_max <= 0.0


@pytest.mark.parametrize("delta", [2 / 255, 8 / 255, 16 / 255])
def test_w2_robust_accuracy_is_at_most_linf_robust_accuracy(trained_tiny, digits, delta: float) -> None:
    """The l∞ ball lies inside the W2 ball of the same radius, so A_δ(W2) ≤ A_δ(l∞) on the same points."""
    _, _, x, y = digits
    w2 = w_pgd(trained_tiny, x, y, Threat("w2-linf", delta), steps=50)
    linf = pgd(trained_tiny, x, y, Threat("linf", delta), steps=20,
               generator=torch.Generator().manual_seed(0))
    assert w2.clean_accuracy == pytest.approx(linf.clean_accuracy)
    assert w2.robust_accuracy <= linf.robust_accuracy
    assert linf.robust_accuracy < linf.clean_accuracy


def test_w_fgsm_spends_the_whole_budget(model64, test_set64) -> None:
    x, y = test_set64
    for kind, delta in (("w2-linf", 8 / 255), ("w2-l2", 0.5)):
        threat = Threat(kind, delta)
        moved = w_fgsm(model64, x, y, threat, loss="ce", clip=False)
        assert threat.distance(moved, x) == pytest.approx(delta, rel=1e-9)
        # points with large gradients move far, flat points barely: the movement is uneven
        per_point = threat.norms(moved - x)
        assert float(per_point.max()) > 5 * float(per_point.median())
    pointwise = w_fgsm(model64, x, y, Threat("linf", 8 / 255), loss="ce", clip=False)
    assert torch.allclose(Threat("linf", 1).norms(pointwise - x), torch.full((len(y),), 8 / 255, dtype=x.dtype))


def test_w_pgd_reports_progress_and_stops_when_asked(trained_tiny, digits) -> None:
    _, _, x, y = digits
    seen: list[tuple[int, int]] = []
    res = w_pgd(trained_tiny, x, y, Threat("w2-linf", 8 / 255), steps=30,
                progress=lambda t, total: seen.append((t, total)), should_stop=lambda: len(seen) >= 5)
    assert seen == [(t, 30) for t in range(1, 6)]
    assert res.steps == 5 and len(res.accuracy_trajectory) == 6


def test_pgd_linf_moves_points_within_ball_and_lowers_accuracy(trained_tiny, digits) -> None:
    _, _, x, y = digits
    weak = pgd(trained_tiny, x, y, Threat("linf", 1 / 255), steps=10, generator=torch.Generator().manual_seed(0))
    strong = pgd(trained_tiny, x, y, Threat("linf", 16 / 255), steps=10, generator=torch.Generator().manual_seed(0))
    assert strong.robust_accuracy < weak.robust_accuracy <= weak.clean_accuracy


def test_pgd_l2_and_the_w2_l2_ball_that_contains_it(trained_tiny, digits) -> None:
    _, _, x, y = digits
    gen = torch.Generator().manual_seed(0)
    small = pgd(trained_tiny, x, y, Threat("l2", 0.25), steps=10, generator=gen)
    large = pgd(trained_tiny, x, y, Threat("l2", 1.0), steps=10, generator=gen)
    assert large.robust_accuracy < small.robust_accuracy < small.clean_accuracy
    w2 = w_pgd(trained_tiny, x, y, Threat("w2-l2", 1.0), steps=30)
    assert w2.robust_accuracy <= large.robust_accuracy
