"""PGD for pointwise threats (l∞ or l2 balls around every image), for quick robustness checks.

A point counts as robust only if the model classifies it correctly at the clean point, the
random start and every iterate (the predictions come from the forward passes the attack
makes anyway, so no extra evaluation pass).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from core.engine.attacks.common import input_gradient, predict
from core.engine.device import Compute, batches
from core.engine.losses import LossName, attack_loss
from core.engine.threats import Threat


@dataclass
class PGDResult:
    kind: str
    delta: float
    steps: int
    robust_accuracy: float
    clean_accuracy: float
    # keep_adv=True: per image, robust (correct at the clean point, the start and every iterate), and the
    # point that fooled it (the first such iterate; the last iterate for a robust image): inside its ball
    correct: torch.Tensor | None = field(default=None, repr=False)
    x_adv: torch.Tensor | None = field(default=None, repr=False)

    @property
    def ratio(self) -> float:
        return self.robust_accuracy / self.clean_accuracy if self.clean_accuracy > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"attack": "pgd", "threat": self.kind, "delta": self.delta, "steps": self.steps,
                "robust_accuracy": self.robust_accuracy, "clean_accuracy": self.clean_accuracy,
                "robust_to_clean_ratio": self.ratio}


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
        steps: int = 20, step_size: float | None = None, loss: LossName = "ce",
        random_start: bool = True, batch_size: int = 500, compute: Compute | None = None,
        generator: torch.Generator | None = None,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None, keep_adv: bool = False) -> PGDResult:
    """PGD with (for l∞) signed-gradient steps of `step_size` (default 2.5·δ/steps, at least
    δ/4 for a handful of steps); for l2, normalised-gradient steps. `should_stop()`, checked
    every step, ends the run early (the result then covers the images attacked so far);
    `progress(done, total)` is called after every step of every batch (total = batches·steps).
    `keep_adv`: the per-image outcome and fooling points (`correct`, `x_adv`), which the W2
    ensemble takes as a member."""
    if threat.distributional:
        raise ValueError("pgd is for pointwise threats; use w_pgd for W2 threats")
    compute = compute or Compute.resolve(x.device, amp="off", channels_last=False)
    loss_fn = attack_loss(loss)
    alpha = step_size if step_size is not None else 2.5 * threat.delta / steps
    n = x.shape[0]
    robust = torch.zeros(n, dtype=torch.bool, device=x.device)
    clean = torch.zeros(n, dtype=torch.bool, device=x.device)
    fooling = x.clone() if keep_adv else None
    chunks = list(batches(n, batch_size))
    attacked = n
    for i, b in enumerate(chunks):
        xb, yb = x[b], y[b]
        ok = predict(model, xb, compute).argmax(dim=1) == yb
        clean[b] = ok
        x_adv = threat.random_start(xb, generator) if random_start else xb
        keep = _FoolingPoints(fooling, b, ok) if fooling is not None else None
        stopped = False
        for s in range(steps):
            g, logits, _ = input_gradient(model, x_adv, yb, loss_fn, compute)
            ok &= logits.argmax(dim=1) == yb
            if keep is not None:
                keep.record(ok, x_adv)
            step = threat.raw_direction(g) * alpha
            x_adv = threat.project(x_adv + step.to(x_adv.dtype), xb)
            if progress is not None:
                progress(i * steps + s + 1, len(chunks) * steps)
            if should_stop is not None and should_stop():
                stopped = True
                break
        ok &= predict(model, x_adv, compute).argmax(dim=1) == yb
        if keep is not None:
            keep.record(ok, x_adv, last=True)
        robust[b] = ok
        if stopped:
            attacked = b.stop
            break
    world = threat.world  # the set may be split across ranks: accuracies over all of it
    return PGDResult(threat.kind, threat.delta, steps, float(world.mean(robust[:attacked].float())),
                     float(world.mean(clean[:attacked].float())),
                     correct=robust[:attacked] if keep_adv else None,
                     x_adv=fooling[:attacked] if fooling is not None else None)


class _FoolingPoints:
    """Writes into `out[b]` each image's first fooling iterate (the clean point for an image
    misclassified already); robust images get their last iterate."""

    def __init__(self, out: torch.Tensor, b: slice, ok: torch.Tensor) -> None:
        self.out, self.b = out, b
        self.open = ok.clone()          # not fooled yet: the clean point stays for the others

    def record(self, ok: torch.Tensor, x_adv: torch.Tensor, last: bool = False) -> None:
        newly = self.open & ~ok
        take = self.open if last else newly
        view = self.out[self.b]
        view[take] = x_adv[take].detach()
        self.open &= ok
