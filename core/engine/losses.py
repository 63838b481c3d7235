"""Per-sample losses on logits (vectorised; every function returns a tensor of shape (B,)).

CE, DLR (AutoAttack's difference of logits ratio), ReDLR = min(DLR, 0) and the TRADES KL
regulariser. Formulas: docs/concepts.md.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

LossName = Literal["ce", "dlr", "redlr", "kl"]


def _full(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (from autocast) in float32; float32/float64 as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_full(logits), y, reduction="none")


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DLR = −(z_y − max_{j≠y} z_j) / (z_(1) − z_(3) + 1e-12); needs at least 3 classes."""
    z = _full(logits)
    if z.shape[1] < 3:
        raise ValueError("DLR needs at least 3 classes (it divides by z_(1) − z_(3))")
    top3 = z.topk(3, dim=1).values
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z_other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return -(z_y - z_other) / (top3[:, 0] - top3[:, 2] + 1e-12)


def redlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ReDLR = min(DLR, 0): DLR on correctly classified points, exactly 0 on fooled ones."""
    return dlr(logits, y).clamp(max=0.0)


def kl_divergence(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """KL(p(x) ‖ p(x')) per sample, from logits."""
    log_p = F.log_softmax(_full(logits_clean), dim=1)
    log_q = F.log_softmax(_full(logits_adv), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def attack_loss(name: LossName, *, logits_clean: torch.Tensor | None = None
                ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-sample loss an attack maximises, as `loss(logits_adv, y)`.

    For `kl` the clean logits are fixed once per batch (computed by the caller, without grad)
    rather than recomputed in every inner step.
    """
    if name == "ce":
        return cross_entropy
    if name == "dlr":
        return dlr
    if name == "redlr":
        return redlr
    if name == "kl":
        if logits_clean is None:
            raise ValueError("the kl attack loss needs the clean logits")
        clean = logits_clean.detach()
        return lambda logits_adv, _y: kl_divergence(clean, logits_adv)
    raise ValueError(f"unknown loss {name!r}; choose one of ce, dlr, redlr, kl")
