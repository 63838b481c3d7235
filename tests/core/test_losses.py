"""Per-sample losses: CE, DLR, ReDLR, KL (algorithm.md, "Losses")."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.engine.losses import attack_loss, cross_entropy, dlr, kl_divergence, redlr


def _logits(seed: int = 0, n: int = 200, c: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, c), generator=g, dtype=torch.float64) * 3, torch.randint(0, c, (n,), generator=g)


def test_dlr_matches_its_definition_point_by_point() -> None:
    z, y = _logits()
    got = dlr(z, y)
    for i in range(len(y)):
        s = sorted(z[i].tolist(), reverse=True)
        others = max(v for j, v in enumerate(z[i].tolist()) if j != int(y[i]))
        want = -(float(z[i, y[i]]) - others) / (s[0] - s[2] + 1e-12)
        assert float(got[i]) == pytest.approx(want, rel=1e-6)


def test_redlr_is_exactly_zero_on_misclassified_points_and_dlr_elsewhere() -> None:
    z, y = _logits(1)
    wrong = z.argmax(1) != y
    assert wrong.any() and (~wrong).any()
    r = redlr(z, y)
    assert torch.all(r[wrong] == 0.0)
    assert torch.all(r[~wrong] < 0.0)
    assert torch.equal(r[~wrong], dlr(z, y)[~wrong])


def test_redlr_gradient_vanishes_on_fooled_points() -> None:
    z, y = _logits(2)
    z.requires_grad_(True)
    redlr(z, y).sum().backward()
    wrong = z.argmax(1) != y
    assert torch.all(z.grad[wrong] == 0)
    assert torch.all(z.grad[~wrong].abs().sum(1) > 0)


def test_dlr_is_invariant_to_shift_and_positive_scale() -> None:
    z, y = _logits(3)
    assert torch.allclose(dlr(3.7 * z + 11.0, y), dlr(z, y), atol=1e-9)


def test_kl_is_nonnegative_zero_at_equality_and_matches_torch() -> None:
    a, _ = _logits(4)
    b, _ = _logits(5)
    kl = kl_divergence(a, b)
    assert torch.all(kl >= -1e-12)
    assert torch.allclose(kl_divergence(a, a), torch.zeros(len(a), dtype=kl.dtype), atol=1e-7)
    ref = F.kl_div(F.log_softmax(b, 1), F.log_softmax(a, 1), log_target=True, reduction="none").sum(1)
    assert torch.allclose(kl, ref, atol=1e-12)


def test_cross_entropy_per_sample_and_attack_loss_lookup() -> None:
    z, y = _logits(6)
    assert torch.allclose(cross_entropy(z, y), F.cross_entropy(z, y, reduction="none"), atol=1e-12)
    assert attack_loss("redlr") is redlr
    with pytest.raises(ValueError, match="clean logits"):
        attack_loss("kl")
    kl = attack_loss("kl", logits_clean=z)
    assert torch.allclose(kl(z, y), torch.zeros(len(y), dtype=z.dtype), atol=1e-12)
    with pytest.raises(ValueError, match="3 classes"):
        dlr(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
