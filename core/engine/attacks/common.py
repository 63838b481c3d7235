"""Pieces every attack shares: one forward+backward giving per-sample input gradients."""
from __future__ import annotations

from collections.abc import Callable

import torch

from core.engine.device import Compute

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def input_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: PerSampleLoss,
                   compute: Compute) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample input gradients of loss_fn at x, with the logits and per-sample losses.

    The model must be in eval mode (no batch statistics), so the gradient of the summed loss
    splits into independent per-sample gradients.
    """
    x = x.detach().requires_grad_(True)
    with compute.autocast():
        logits = model(x)
    loss = loss_fn(logits, y)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad, logits.detach(), loss.detach()


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, compute: Compute) -> torch.Tensor:
    with compute.autocast():
        out = model(x)
    logits: torch.Tensor = out if out.dtype in (torch.float32, torch.float64) else out.float()
    return logits
