"""The pointwise (l∞ or l2 ball) robust accuracy, as the field measures it.

Attacks, by name (`EvaluateConfig.linf_attacks`; the preset's choice when it is not given):
- "autoattack": AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square), the RobustBench
  protocol; the standard preset's choice on a GPU.
- "apgd": its two gradient attacks, APGD-CE then APGD-T (9 target classes), the standard preset's
  choice on a CPU, where FAB-T and Square cost several times more (docs/runtimes.md measures both).
- "pgd": PGD with a random start (CE, `steps` steps of `step_ratio`·δ for l∞), the quick preset's.
The result names the attacks run, and keeps per image whether it stayed robust and the point that
fooled it (`correct`, `x_adv`): `ensemble.Member.of(result)` makes that set a member of the W2
ensemble at the same δ and ground cost, so the report's W2 number is never above this one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from core.engine.attacks.autoattack import CPU_ATTACKS, STANDARD_ATTACKS, autoattack
from core.engine.attacks.pgd import pgd
from core.engine.device import Compute
from core.engine.evaluation.intervals import accuracy_stat, share
from core.engine.losses import LossName
from core.engine.oom import AdaptiveBatch
from core.engine.threats import Threat

__all__ = ["PointwiseAttack", "PointwiseResult", "pointwise_attack"]

PointwiseAttack = Literal["autoattack", "apgd", "pgd"]


@dataclass
class PointwiseResult:
    name: str                        # "autoattack-standard", "apgd-ce+apgd-t" or "pgd"
    threat: str                      # "linf" or "l2"
    delta: float
    correct: torch.Tensor = field(repr=False)
    x_adv: torch.Tensor = field(repr=False)
    clean_accuracy: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)   # steps, or accuracy after each AutoAttack attack

    @property
    def robust_accuracy(self) -> float:
        return share(self.correct)

    def to_dict(self) -> dict[str, Any]:
        stat = accuracy_stat(self.correct)
        clean = self.clean_accuracy
        return {"attack": self.name, "threat": self.threat, "delta": self.delta,
                "robust_accuracy": stat["accuracy"], "n": stat["n"], "ci95": stat["ci95"],
                "clean_accuracy": clean, "robust_to_clean_ratio": stat["accuracy"] / clean if clean > 0 else 0.0,
                **self.details}


def pointwise_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, attack: str, *,
                     batch_size: int | AdaptiveBatch = 256, compute: Compute | None = None, seed: int = 0,
                     steps: int = 20, step_ratio: float | None = 0.25, loss: LossName = "ce",
                     on_attack: Callable[[str, int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> PointwiseResult:
    """Robust accuracy of (x, y) in the pointwise ball of `threat` under `attack` (module docstring).
    `steps`, `step_ratio` (l∞ step as a fraction of δ; None: PGD's default) and `loss` are PGD's.
    Progress: `progress(done, total)` after each PGD step; AutoAttack calls `on_attack(name, k, count)`
    before each of its attacks."""
    ball = threat.pointwise
    compute = compute or Compute.resolve(x.device, amp="off", channels_last=False)
    batch = batch_size if isinstance(batch_size, AdaptiveBatch) else AdaptiveBatch(int(batch_size))
    if attack == "pgd":
        res = batch.run(f"pgd δ={ball.delta:.4g}", lambda size: pgd(
            model, x, y, ball, steps=steps,
            step_size=step_ratio * ball.delta if ball.ground == "linf" and step_ratio is not None else None,
            loss=loss, batch_size=size, compute=compute, generator=torch.Generator(device=x.device).manual_seed(seed),
            should_stop=should_stop, keep_adv=True, progress=progress))
        assert res.correct is not None and res.x_adv is not None
        return PointwiseResult("pgd", ball.ground, ball.delta, res.correct, res.x_adv, res.clean_accuracy,
                               {"steps": steps, "loss": loss})
    if attack not in ("autoattack", "apgd"):
        raise ValueError(f"unknown pointwise attack {attack!r}; choose autoattack, apgd or pgd")
    names = STANDARD_ATTACKS if attack == "autoattack" else CPU_ATTACKS
    with compute.autocast():
        aa = batch.run(f"autoattack δ={ball.delta:.4g}", lambda size: autoattack(
            model, x, y, ball, batch_size=size, seed=seed, attacks=names, on_attack=on_attack))
    assert aa.correct is not None and aa.x_adv is not None
    return PointwiseResult(aa.name, ball.ground, ball.delta, aa.correct, aa.x_adv, aa.clean_accuracy,
                           {"attacks": list(names), "accuracy_after": aa.accuracy_after})
