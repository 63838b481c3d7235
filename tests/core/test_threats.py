"""Invariants of the threat models (algorithm.md, "Projection" and "Sensitivity")."""
from __future__ import annotations

import pytest
import torch

from core.engine.threats import Threat

KINDS = ["w2-linf", "w2-l2", "linf", "l2"]


def _set(seed: int = 0, n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, 8, 8), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_projection_lands_in_ball_and_box(kind: str) -> None:
    x = _set()
    delta = 0.05 if kind.endswith("linf") else 0.5
    threat = Threat(kind, delta)
    g = torch.Generator().manual_seed(1)
    far = x + torch.randn(x.shape, generator=g, dtype=torch.float64) * 0.3
    far[:10] *= 5  # a few points far outside, the rest moderately
    proj = threat.project(far, x)
    assert proj.min() >= 0.0 and proj.max() <= 1.0
    assert threat.distance(proj, x) <= delta * (1 + 1e-9)
    if not threat.distributional:
        assert threat.norms(proj - x).max() <= delta * (1 + 1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_point_inside_ball_is_unchanged(kind: str) -> None:
    x = _set().clamp(0.2, 0.8)
    threat = Threat(kind, 0.1 if kind.endswith("linf") else 1.0)
    g = torch.Generator().manual_seed(2)
    e = torch.randn(x.shape, generator=g, dtype=torch.float64)
    e = e / threat.norms(e).reshape(-1, 1, 1, 1) * threat.delta * 0.5   # every ‖e_i‖ = δ/2
    inside = x + e
    assert threat.distance(inside, x) < threat.delta
    assert torch.equal(threat.project(inside, x), inside)


def test_w2_linf_projection_shrinks_every_image_by_the_same_factor() -> None:
    x = _set().clamp(0.3, 0.7)
    threat = Threat("w2-linf", 0.01)
    g = torch.Generator().manual_seed(3)
    e = torch.randn(x.shape, generator=g, dtype=torch.float64) * 0.05
    proj = threat.project(x + e, x)
    ratio = threat.norms(proj - x) / threat.norms(e)
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-9)
    assert threat.distance(proj, x) == pytest.approx(0.01, rel=1e-9)   # ends on the sphere


@pytest.mark.parametrize("kind", ["w2-linf", "w2-l2"])
@pytest.mark.parametrize("alpha", [1e-3, 0.02, 0.3])
def test_normalised_step_moves_set_by_exactly_alpha(kind: str, alpha: float) -> None:
    x = _set()
    threat = Threat(kind, 1.0)
    g = torch.Generator().manual_seed(4)
    grads = torch.randn(x.shape, generator=g, dtype=torch.float64) * torch.rand((64, 1, 1, 1), generator=g,
                                                                                  dtype=torch.float64)
    dual = threat.dual_norms(grads)
    d = threat.raw_direction(grads, dual) / threat.normaliser(dual)
    assert threat.distance(x + alpha * d, x) == pytest.approx(alpha, rel=1e-10)


@pytest.mark.parametrize("kind", ["w2-linf", "w2-l2"])
def test_direction_attains_sensitivity_and_beats_other_directions(kind: str) -> None:
    """First-order gain of the normalised direction is Υ; any direction of unit W2 size gains ≤ Υ."""
    threat = Threat(kind, 1.0)
    g = torch.Generator().manual_seed(5)
    grads = torch.randn((32, 1, 6, 6), generator=g, dtype=torch.float64)
    grads[:8] *= 10
    dual = threat.dual_norms(grads)
    upsilon = float(threat.sensitivity(dual))
    d = threat.raw_direction(grads, dual) / threat.normaliser(dual)
    gain = float((grads * d).flatten(1).sum(1).mean())
    assert gain == pytest.approx(upsilon, rel=1e-10)
    if kind == "w2-linf":
        assert upsilon == pytest.approx(float(grads.flatten(1).abs().sum(1).square().mean().sqrt()), rel=1e-12)
    for _ in range(20):
        other = torch.randn(grads.shape, generator=g, dtype=torch.float64)
        other_size = threat.norms(other).square().mean().sqrt()
        other_gain = float((grads * other / other_size).flatten(1).sum(1).mean())
        assert other_gain <= upsilon + 1e-9


def test_pointwise_random_start_stays_in_ball() -> None:
    x = _set()
    for kind, delta in (("linf", 8 / 255), ("l2", 0.5)):
        threat = Threat(kind, delta)
        start = threat.random_start(x, torch.Generator().manual_seed(0))
        assert threat.norms(start - x).max() <= delta * (1 + 1e-9)
        assert float(start.min()) >= 0.0 and float(start.max()) <= 1.0
