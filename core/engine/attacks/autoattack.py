"""AutoAttack ("standard": APGD-CE, APGD-T, FAB-T, Square) through PyPI's `pyautoattack`.

The attacks run one after another on the points still robust, as the standard protocol
does, so the job's progress can say which attack is running. The result keeps, per image,
whether it stayed robust and the point that fooled it (`correct`, `x_adv`): the W2 evaluation
ensemble takes that perturbed set as a member (it lies inside the W2 ball of the same δ).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from core.engine.threats import Threat

log = logging.getLogger(__name__)

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
CPU_ATTACKS = ("apgd-ce", "apgd-t")   # the gradient attacks of the standard version (docs/runtimes.md)


@dataclass
class AutoAttackResult:
    delta: float
    norm: str
    n_examples: int
    clean_accuracy: float
    robust_accuracy: float
    accuracy_after: dict[str, float] = field(default_factory=dict)
    attacks: tuple[str, ...] = STANDARD_ATTACKS
    correct: torch.Tensor | None = field(default=None, repr=False)   # per image: robust to every attack
    x_adv: torch.Tensor | None = field(default=None, repr=False)     # per image: the point that fooled it

    @property
    def name(self) -> str:
        """"autoattack-standard" for the whole standard version, else the attacks run, e.g. "apgd-ce+apgd-t"."""
        return "autoattack-standard" if self.attacks == STANDARD_ATTACKS else "+".join(self.attacks)

    @property
    def ratio(self) -> float:
        return self.robust_accuracy / self.clean_accuracy if self.clean_accuracy > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.name, "attacks": list(self.attacks), "norm": self.norm, "delta": self.delta,
                "n_examples": self.n_examples, "clean_accuracy": self.clean_accuracy,
                "robust_accuracy": self.robust_accuracy, "robust_to_clean_ratio": self.ratio,
                "accuracy_after": self.accuracy_after}


def autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
               batch_size: int = 250, seed: int = 0, attacks: tuple[str, ...] = STANDARD_ATTACKS,
               on_attack: Callable[[str, int, int], None] | None = None,
               target_classes: int = 9) -> AutoAttackResult:
    """Robust accuracy of (x, y) under AutoAttack in the pointwise ball of `threat`.

    `on_attack(name, index, count)` is called before each attack starts. `target_classes`: how many
    of the highest-scoring wrong classes APGD-T and FAB-T target in turn; the standard version's 9
    is what every report uses (bench/apgd_targets.py measures what fewer would lose).
    """
    from pyautoattack import AutoAttack

    norm = {"linf": "Linf", "l2": "L2"}[threat.ground]
    num_classes = int(model(x[:1]).shape[1])
    adversary = AutoAttack(model, device=x.device, eps=threat.delta, norm=norm, seed=seed,
                           version="standard")
    adversary.apgd_targeted.n_target_classes = min(target_classes, num_classes - 1)
    adversary.fab.n_target_classes = min(target_classes, num_classes - 1)
    with torch.no_grad():
        robust = torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                            for i in range(0, x.shape[0], batch_size)])
    clean_acc = float(robust.float().mean())
    x_adv = x.clone()
    after: dict[str, float] = {}
    for k, name in enumerate(attacks):
        if on_attack is not None:
            on_attack(name, k, len(attacks))
        idx = robust.nonzero().squeeze(1)
        if idx.numel() > 0:
            adversary.attacks_to_run = [name]
            found, y_pred = adversary.run_standard_evaluation(x[idx], y[idx], batch_size=batch_size)
            fooled = y_pred.to(robust.device) != y[idx]
            x_adv[idx[fooled]] = found.to(x_adv.device, x_adv.dtype)[fooled]
            robust[idx] = ~fooled
        after[name] = float(robust.float().mean())
        log.info("AutoAttack %s: robust accuracy %.4f", name, after[name])
    return AutoAttackResult(threat.delta, norm, int(x.shape[0]), clean_acc, float(robust.float().mean()), after,
                            tuple(attacks), robust, x_adv)
