"""Threat models (p, r, δ): a small object per threat with the pieces attacks are made of.

After MadryLab's `attack_steps`: each threat knows its ground norm, how to turn per-sample
input gradients into a step direction, its sensitivity Υ, its distance and its projection.
W2 threats (p = 2) normalise and project over the whole set; pointwise threats (W∞) act on
each image alone. Formulas: docs/concepts.md. When a set is split across processes,
`across(world)` makes every whole-set quantity (means over the set) global: see core.engine.distributed.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from core.engine.config import ThreatModelSpec
from core.engine.distributed import SINGLE, World

_EPS = 1e-12


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor shaped to broadcast against images (B, C, H, W)."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


@dataclass(frozen=True)
class Threat:
    kind: Literal["w2-linf", "w2-l2", "linf", "l2"]
    delta: float
    # the processes holding the set (SINGLE: this one holds all of it)
    world: World = field(default=SINGLE, compare=False, repr=False)

    @classmethod
    def from_spec(cls, spec: ThreatModelSpec, delta: float | None = None) -> Threat:
        radius = spec.delta if delta is None else delta
        if radius is None:
            raise ValueError("a threat needs a radius δ: the spec states none and none was given")
        return cls(kind=spec.kind, delta=float(radius))

    def with_delta(self, delta: float) -> Threat:
        return replace(self, delta=float(delta))

    def across(self, world: World) -> Threat:
        """The same threat on a set whose shards live on `world`'s ranks."""
        return replace(self, world=world)

    @property
    def distributional(self) -> bool:
        return self.kind.startswith("w2")

    @property
    def ground(self) -> Literal["linf", "l2"]:
        return "linf" if self.kind.endswith("linf") else "l2"

    def labels(self) -> dict[str, float | str]:
        """What a set of metrics at this threat measured: the radius, the job's threat model, and
        the two balls its robust accuracies refer to (W2 with this ground cost, and pointwise)."""
        return {"delta": self.delta, "threat_model": self.kind, "w2_threat": f"w2-{self.ground}",
                "pointwise_threat": self.ground}

    @property
    def w2(self) -> Threat:
        """The W2 threat with the same ground norm and radius (itself if distributional)."""
        return self if self.distributional else replace(self, kind="w2-linf" if self.ground == "linf" else "w2-l2")

    @property
    def pointwise(self) -> Threat:
        """The pointwise threat with the same ground norm and radius (its ball lies inside ours)."""
        return replace(self, kind=self.ground)

    # --- norms --------------------------------------------------------------------------
    def norms(self, e: torch.Tensor) -> torch.Tensor:
        """‖e_i‖_r per sample (the ground norm)."""
        f = _flat(e)
        return f.abs().amax(dim=1) if self.ground == "linf" else f.norm(dim=1)

    def dual_norms(self, g: torch.Tensor) -> torch.Tensor:
        """‖g_i‖_s per sample, s = r/(r−1): l1 for r = ∞, l2 for r = 2."""
        f = _flat(g)
        return f.abs().sum(dim=1) if self.ground == "linf" else f.norm(dim=1)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> float:
        """W_p distance with the identity coupling: (mean_i ‖x'_i − x_i‖_r^2)^{1/2}; W∞ for pointwise."""
        n = self.norms(x_adv - x).double()
        return float(self.world.mean(n.square()).sqrt()) if self.distributional else float(self.world.max(n))

    # --- the first-order step ---------------------------------------------------------
    def raw_direction(self, g: torch.Tensor, dual: torch.Tensor | None = None) -> torch.Tensor:
        """h_i before the set's normalisation.

        w2-linf: sgn(g_i)·‖g_i‖_1; w2-l2: g_i; linf: sgn(g_i); l2: g_i/‖g_i‖_2.
        """
        if dual is None:
            dual = self.dual_norms(g)
        if self.kind == "w2-linf":
            return g.sign() * _per_sample(dual, g)
        if self.kind == "w2-l2":
            return g
        if self.kind == "linf":
            return g.sign()
        return g / _per_sample(dual.clamp_min(_EPS), g)

    def unit_direction(self, g: torch.Tensor, dual: torch.Tensor | None = None) -> torch.Tensor:
        """u_i = h_i / ‖h_i‖_r, the steepest-ascent direction of unit ground norm (‖h_i‖_r = ‖g_i‖_s for
        W2 threats): sgn(g_i) for w2-linf, g_i/‖g_i‖_2 for w2-l2."""
        if dual is None:
            dual = self.dual_norms(g)
        return self.raw_direction(g, dual) / _per_sample(dual.clamp_min(_EPS), g)

    def normaliser(self, dual_all: torch.Tensor) -> torch.Tensor:
        """N = (mean_i ‖h_i‖_r^2)^{1/2} over the whole set, a 0-d tensor on the device.

        ‖h_i‖_r = ‖g_i‖_s for both W2 threats, so N equals the sensitivity Υ. Pointwise
        directions need no normalisation (N = 1)."""
        if not self.distributional:
            return torch.ones((), device=dual_all.device, dtype=torch.float64)
        return self.world.mean(dual_all.double().square()).sqrt()

    def sensitivity(self, dual_all: torch.Tensor) -> torch.Tensor:
        """Υ = (mean_i ‖g_i‖_s^q)^{1/q}: q = 2 for W2 threats, q = 1 for pointwise (W∞) ones."""
        d = dual_all.double()
        return self.world.mean(d.square()).sqrt() if self.distributional else self.world.mean(d)

    # --- projection -------------------------------------------------------------------
    def project(self, x_adv: torch.Tensor, x: torch.Tensor,
                delta: float | torch.Tensor | None = None) -> torch.Tensor:
        """Project the whole set X' onto the ball of radius δ around X, then into [0, 1].

        W2: ρ = min(1, δ/D); r = ∞ clamps every perturbation element-wise to ±ρ·‖x'_i − x_i‖_∞,
        r = 2 scales it by ρ. Pointwise: each image into its own ball. No host synchronisation,
        so the attack loop never waits on the device; ρ is exactly 1 inside the ball.
        """
        delta = self.delta if delta is None else delta
        e = x_adv - x
        if self.distributional:
            n = self.norms(e)
            dist = self.world.mean(n.double().square()).sqrt()
            rho = (delta / (dist + _EPS)).clamp(max=1.0).to(e.dtype)
            if self.ground == "linf":
                bound = _per_sample(rho * n, e)
                e = torch.minimum(torch.maximum(e, -bound), bound)
            else:
                e = e * rho
        elif self.ground == "linf":
            if isinstance(delta, torch.Tensor):
                e = torch.minimum(torch.maximum(e, -delta), delta)
            else:
                e = e.clamp(-delta, delta)
        else:
            n = _per_sample(self.norms(e), e)
            e = e * torch.clamp(delta / (n + _EPS), max=1.0)
        return (x + e).clamp(0.0, 1.0)

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform start inside a pointwise ball (PGD's random restart)."""
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        if self.ground == "linf":
            e = noise * self.delta
        else:
            e = noise / _per_sample(self.norms(noise).clamp_min(_EPS), noise) * self.delta
        return (x + e).clamp(0.0, 1.0)
