"""The W2 evaluation ensemble: the reported W2 robust accuracy at δ is the minimum over attacks.

Every attack below moves the whole evaluated set inside the same W2 ball (ground cost l∞ or l2,
radius δ), so each one's accuracy is a valid upper bound on the W2 robust accuracy, and so is
their minimum. An attack's per-image outcomes cannot be mixed with another's: the images share
one budget, so "fooled by either" is not a set inside the ball. The minimum is over whole sets.

The presets (PRESETS; docs/concepts.md has the table and docs/runtimes.md the costs):

    preset    W-PGD attacks                                  patience  step cap  pointwise (l∞/l2)
    standard  ReDLR, CE, ReDLR from a random start in the ball    25       500   AutoAttack standard on
                                                                                 CUDA; APGD-CE + APGD-T on CPU
    quick     ReDLR, CE                                           10       100   PGD (CE, 20 steps)

Adaptive steps: each W-PGD attack takes its step α = ratio·δ/T (T = `steps`, the nominal count,
`EvaluateConfig.wpgd_steps`), runs at least T steps, then goes on until its whole-set accuracy has
not reached a new minimum for `patience` steps, up to the cap (never below T + patience, so a large
T alone cannot make an attack stop at its cap). An attack that hit the cap is "not converged".
With `adaptive=False` every attack runs exactly T steps; with only the ReDLR attack that is
today's w_pgd exactly (the reference-structured W-PGD, whole-set normalisation and projection, min
over iterates, is core.engine.attacks.wpgd.w_pgd, called unchanged).

Members: perturbed copies of x that are W2-feasible by construction, e.g. the pointwise attack's
points at the same δ and ground cost (every image within δ, so the set is within δ in W2). They
enter the minimum like an attack, which makes W2 ≤ l∞ hold by construction in every report.

For B2 (fine-tuning): call `w2_ensemble(model, x, y, threat.w2, preset="standard", steps=...,
batch_size=AdaptiveBatch or int, compute=..., seed=..., members=[Member.of(pointwise_result)])`;
the result's `.correct` (per image, of the minimising attack) feeds intervals.paired_change and
perclass.per_class, `.to_dict()` is the report row, and `.warnings()` the not-converged lines.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from core.engine.attacks.common import predict
from core.engine.attacks.wpgd import WPGDResult, w_pgd
from core.engine.device import Compute, batches
from core.engine.evaluation.intervals import accuracy_stat, share
from core.engine.losses import LossName
from core.engine.oom import AdaptiveBatch
from core.engine.threats import Threat

__all__ = [
    "PRESETS",
    "AttackSpec",
    "Member",
    "Preset",
    "PresetSpec",
    "W2EnsembleResult",
    "preset_attacks",
    "random_w2_start",
    "w2_ensemble",
]

Preset = Literal["standard", "quick"]
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class AttackSpec:
    """One W-PGD attack of an ensemble: its loss and where it starts."""

    name: str
    loss: LossName
    random_start: bool = False   # from a random W2-feasible point (random_w2_start) instead of x


@dataclass(frozen=True)
class PresetSpec:
    attacks: tuple[AttackSpec, ...]
    patience: int
    cap: int                     # most steps an attack takes (at least its nominal steps)
    pointwise_cuda: str          # the pointwise attack on a GPU (core.engine.evaluation.pointwise)
    pointwise_cpu: str

    def pointwise(self, device_type: str) -> str:
        return self.pointwise_cuda if device_type == "cuda" else self.pointwise_cpu

    def describe(self) -> dict[str, Any]:
        return {"attacks": [a.name for a in self.attacks], "patience": self.patience, "step_cap": self.cap,
                "pointwise": {"cuda": self.pointwise_cuda, "cpu": self.pointwise_cpu}}


REDLR = AttackSpec("w-pgd-redlr", "redlr")
CE = AttackSpec("w-pgd-ce", "ce")
REDLR_RESTART = AttackSpec("w-pgd-redlr-random-start", "redlr", random_start=True)

PRESETS: dict[str, PresetSpec] = {
    "standard": PresetSpec((REDLR, CE, REDLR_RESTART), patience=25, cap=500,
                           pointwise_cuda="autoattack", pointwise_cpu="apgd"),
    "quick": PresetSpec((REDLR, CE), patience=10, cap=100, pointwise_cuda="pgd", pointwise_cpu="pgd"),
}


def preset_attacks(preset: Preset, loss: LossName = "redlr") -> tuple[AttackSpec, ...]:
    """The preset's W-PGD attacks with `loss` in place of ReDLR (the second attack stays
    cross-entropy, or becomes ReDLR when `loss` is ce, so that two losses are always tried)."""
    second: LossName = "redlr" if loss == "ce" else "ce"

    def swapped(a: AttackSpec) -> AttackSpec:
        if a.loss == "redlr":
            return AttackSpec(a.name.replace("redlr", loss), loss, a.random_start)
        return AttackSpec(a.name.replace("ce", second), second, a.random_start)

    return tuple(swapped(a) for a in PRESETS[preset].attacks)


@dataclass
class Member:
    """A perturbed copy of x inside the W2 ball, with (optionally) the per-image outcome its maker
    measured; the ensemble counts an image correct only if both that outcome and its own forward
    pass say so (each image's fooling point lies in its ball, so that choice is a valid set)."""

    name: str
    x_adv: torch.Tensor
    correct: torch.Tensor | None = None

    @classmethod
    def of(cls, result: Any) -> Member:
        """A pointwise result (core.engine.evaluation.pointwise.PointwiseResult) as a member."""
        return cls(f"{result.name} ({result.threat} ball)", result.x_adv, result.correct)


@dataclass
class Outcome:
    """One attack's (or member's) whole-set result inside the ball."""

    name: str
    kind: str                    # "w-pgd" or "member"
    correct: torch.Tensor = field(repr=False)
    run: WPGDResult | None = field(default=None, repr=False)

    @property
    def robust_accuracy(self) -> float:
        return share(self.correct)

    loss: str | None = None      # the W-PGD attack's loss

    @property
    def converged(self) -> bool | None:
        return self.run.converged if self.run is not None else None

    def to_dict(self) -> dict[str, Any]:
        stat = accuracy_stat(self.correct)
        row: dict[str, Any] = {"attack": self.name, "kind": self.kind, "robust_accuracy": stat["accuracy"],
                               "n": stat["n"], "ci95": stat["ci95"]}
        if self.run is not None:
            row.update(steps=self.run.steps, converged=self.run.converged, stopped_by=self.run.stopped_by,
                       worst_step=self.run.worst_step, loss_max=self.run.loss_max,
                       final_distance=self.run.final_distance)
        return row


@dataclass
class W2EnsembleResult:
    threat: str
    delta: float
    preset: str
    clean_correct: torch.Tensor = field(repr=False)
    clean_pred: torch.Tensor = field(repr=False)
    outcomes: list[Outcome] = field(default_factory=list)
    stopped: bool = False
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> Outcome:
        """The minimising attack (the first in order among ties: attacks before members)."""
        return min(self.outcomes, key=lambda o: float(o.correct.sum()))

    @property
    def correct(self) -> torch.Tensor:
        """Per image: classified correctly under the minimising attack."""
        return self.best.correct

    @property
    def robust_accuracy(self) -> float:
        return self.best.robust_accuracy

    @property
    def clean_accuracy(self) -> float:
        return share(self.clean_correct)

    @property
    def attacks(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == "w-pgd"]

    @property
    def converged(self) -> bool:
        """Every W-PGD attack stopped because it had stopped improving (none hit the step cap)."""
        return all(o.converged for o in self.attacks)

    def warnings(self) -> list[str]:
        """One line per attack that hit its step cap."""
        return [f"W-PGD ({o.name}) had not converged at δ={self.delta:.4g}: its accuracy was still falling "
                f"when it reached the step cap of {o.run.steps} steps, so its {o.robust_accuracy:.4f} is an upper "
                "bound; the ensemble's number is the minimum over all attacks."
                for o in self.attacks if o.run is not None and not o.converged and o.run.stopped_by != "request"]

    def to_dict(self) -> dict[str, Any]:
        """The report row: the ensemble's number with n and ci95, and a row per attack and member.
        `sensitivity`, `loss_clean`, `first_order_estimate` and `accuracy_trajectory` are the
        first attack's (W-PGD-ReDLR from the clean images, the reference attack)."""
        stat = accuracy_stat(self.correct)
        clean = self.clean_accuracy
        first = self.attacks[0].run if self.attacks and self.attacks[0].run is not None else None
        row: dict[str, Any] = {
            "threat": self.threat, "delta": self.delta, "evaluation": self.preset,
            "robust_accuracy": stat["accuracy"], "n": stat["n"], "ci95": stat["ci95"],
            "clean_accuracy": clean, "robust_to_clean_ratio": stat["accuracy"] / clean if clean > 0 else 0.0,
            "attack": self.best.name, "converged": self.converged,
            "attacks": [o.to_dict() for o in self.attacks],
            "members": [o.to_dict() for o in self.outcomes if o.kind == "member"],
            "settings": self.settings,
        }
        if first is not None:
            row.update(sensitivity=first.sensitivity, loss_clean=first.loss_clean, loss_max=first.loss_max,
                       first_order_estimate=first.first_order_estimate, steps=first.steps,
                       worst_step=first.worst_step, accuracy_trajectory=first.accuracy_trajectory)
        return row


def random_w2_start(x: torch.Tensor, threat: Threat, generator: torch.Generator, fraction: float) -> torch.Tensor:
    """A random point of the W2 ball: every image moved along a random direction of unit ground
    norm (uniform signs and magnitudes for l∞, Gaussian for l2) by a random size, the sizes
    scaled so that the set's W2 distance is `fraction`·δ, then clipped to [0, 1] (which only
    shortens a move). Across ranks the scale uses the whole set's mean."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    if threat.ground == "linf":
        e = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    else:
        e = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    e = e / threat.norms(e).clamp_min(1e-12).reshape(shape)
    sizes = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=torch.float64)
    scale = fraction * threat.delta / threat.world.mean(sizes.square()).sqrt().clamp_min(1e-12)
    return (x + e * (sizes * scale).to(x.dtype).reshape(shape)).clamp(0.0, 1.0)


def clean_predictions(model: torch.nn.Module, x: torch.Tensor, batch_size: int, compute: Compute) -> torch.Tensor:
    return torch.cat([predict(model, x[b], compute).argmax(dim=1) for b in batches(x.shape[0], batch_size)])


def w2_ensemble(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
                preset: Preset = "standard", batch_size: int | AdaptiveBatch = 256, compute: Compute | None = None,
                seed: int = 0, steps: int = 50, step_ratio: float = 1.875,
                attacks: Sequence[AttackSpec] | None = None, adaptive: bool = True,
                patience: int | None = None, cap: int | None = None,
                progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                members: Sequence[torch.Tensor | Member] = ()) -> W2EnsembleResult:
    """W2 robust accuracy of (x, y) at `threat` (a W2 threat) as the minimum over the preset's
    W-PGD attacks (or `attacks`) and the `members` (module docstring). `patience` and `cap` replace
    the preset's; `progress(fraction, phase)` reports the share of the ensemble done; `should_stop()`
    ends it early (`stopped`)."""
    if not threat.distributional:
        raise ValueError(f"w2_ensemble needs a W2 threat, not {threat.kind!r}; use threat.w2")
    compute = compute or Compute.resolve(x.device, amp="off", channels_last=False)
    spec = PRESETS[preset]
    chosen = tuple(attacks) if attacks is not None else spec.attacks
    patience = (spec.patience if patience is None else patience) if adaptive else None
    cap = max(steps + (patience or 0), spec.cap if cap is None else cap) if adaptive else steps
    batch = batch_size if isinstance(batch_size, AdaptiveBatch) else AdaptiveBatch(int(batch_size))
    if progress is not None:
        progress(0.0, f"clean δ={threat.delta:.4g}")
    pred = batch.run("clean", lambda size: clean_predictions(model, x, size, compute))
    result = W2EnsembleResult(threat.kind, threat.delta, preset, pred == y, pred, settings={
        "attacks": [a.name for a in chosen], "nominal_steps": steps, "step_ratio": step_ratio,
        "patience": patience, "step_cap": cap})
    generator = torch.Generator(device=x.device).manual_seed(seed)
    fraction = float(torch.rand((), generator=torch.Generator().manual_seed(seed)))   # the same on every rank
    for k, attack in enumerate(chosen):
        start = random_w2_start(x, threat, generator, 0.5 + 0.5 * fraction) if attack.random_start else None
        phase = f"w-pgd {attack.name} δ={threat.delta:.4g}"
        report = None if progress is None else _share(progress, k, len(chosen), phase, steps + (patience or 0))

        def attempt(size: int, attack: AttackSpec = attack, start: torch.Tensor | None = start,
                    report: Callable[[int, int], None] | None = report) -> WPGDResult:
            return w_pgd(model, x, y, threat, steps=steps, step_ratio=step_ratio, loss=attack.loss,
                         batch_size=size, compute=compute, progress=report, should_stop=should_stop, start=start,
                         patience=patience, max_steps=cap, keep_correct=True)

        run = batch.run(phase, attempt)
        assert run.correct is not None
        result.outcomes.append(Outcome(attack.name, "w-pgd", run.correct, run, attack.loss))
        if run.stopped_by == "request":
            result.stopped = True
            return result
    for i, m in enumerate(members):
        member = m if isinstance(m, Member) else Member(f"member {i + 1}", m)
        result.outcomes.append(Outcome(member.name, "member", _member_correct(model, x, y, threat, member, batch,
                                                                              compute)))
    return result


def _share(progress: Progress, k: int, count: int, phase: str, expected: int) -> Callable[[int, int], None]:
    """An attack's step progress (t of at most `total`) as the ensemble's share done. An adaptive
    attack usually stops near its nominal steps + patience (`expected`), far below its cap: the
    share follows `expected` (held just below the attack's end while it runs longer), so that the
    bar and the ETA do not crawl and then jump."""
    def report(t: int, total: int) -> None:
        within = t / total if expected >= total else min(t / max(expected, 1), 0.99)
        progress((k + within) / count, phase)

    return report


def _member_correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, member: Member,
                    batch: AdaptiveBatch, compute: Compute) -> torch.Tensor:
    """The member's per-image outcome, after checking that it lies in the ball."""
    if member.x_adv.shape != x.shape:
        raise ValueError(f"member {member.name!r} has shape {tuple(member.x_adv.shape)}, not x's {tuple(x.shape)}")
    distance = threat.distance(member.x_adv.to(x.dtype), x)
    if distance > threat.delta * (1 + 1e-5) + 1e-6:
        raise ValueError(f"member {member.name!r} lies outside the W2 ball: "
                         f"distance {distance:.6g} > δ={threat.delta:.6g}")
    pred = batch.run(f"member {member.name}", lambda size: clean_predictions(model, member.x_adv.to(x.dtype), size,
                                                                             compute))
    correct = pred == y
    return correct if member.correct is None else correct & member.correct.to(correct.device)
