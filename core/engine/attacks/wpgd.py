"""W-PGD: the Wasserstein distributional attack (NeurIPS 2023), fused for speed.

Whole-set normalisation and projection exactly as algorithm.md defines them (over all ranks'
shards when the threat spans several processes: `Threat.across`): the set's perturbed copy lives
on the device, every step takes one forward+backward per batch, and the accuracy of iterate t
is read off the forward pass that takes step t+1's gradient, so no separate evaluation pass is
needed; one final forward scores the last iterate. Nothing is copied to the host until the run
ends.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from core.engine.attacks.common import PerSampleLoss, input_gradient, predict
from core.engine.device import Compute, batches
from core.engine.losses import LossName, attack_loss
from core.engine.threats import Threat


@dataclass
class WPGDResult:
    delta: float
    steps: int
    robust_accuracy: float          # A_δ = min_t acc_t (t = 0..T; X_0 = X is in the ball too)
    clean_accuracy: float           # acc_0
    accuracy_trajectory: list[float]
    loss_trajectory: list[float]    # mean attack loss at X_0..X_T
    loss_clean: float               # V(0)
    loss_max: float
    sensitivity: float              # Υ at the clean point
    first_order_estimate: float     # V(0) + δ·Υ
    worst_step: int
    final_distance: float           # W_p distance of X_T from X (≤ δ)
    x_final: torch.Tensor | None = field(default=None, repr=False)
    # per image: classified correctly at the worst iterate (keep_correct=True), for intervals and per-class numbers
    correct: torch.Tensor | None = field(default=None, repr=False)
    patience: int | None = None     # adaptive stop: the run ended after this many steps without a new minimum
    stopped_by: str = "steps"       # "steps" (fixed count), "patience", "cap" (max_steps) or "request" (should_stop)

    @property
    def ratio(self) -> float:
        return self.robust_accuracy / self.clean_accuracy if self.clean_accuracy > 0 else 0.0

    @property
    def converged(self) -> bool:
        """The attack had reached its minimum accuracy before the last quarter of its steps.

        If the accuracy still fell in the last quarter, more steps would likely fool more
        points: the robust accuracy is then an upper bound that may be loose.
        """
        if self.patience is not None:
            return self.stopped_by == "patience"
        return converged(self.accuracy_trajectory)

    def to_dict(self) -> dict[str, Any]:
        return {
            "delta": self.delta, "steps": self.steps,
            "robust_accuracy": self.robust_accuracy, "clean_accuracy": self.clean_accuracy,
            "robust_to_clean_ratio": self.ratio, "worst_step": self.worst_step,
            "accuracy_trajectory": self.accuracy_trajectory, "loss_trajectory": self.loss_trajectory,
            "loss_clean": self.loss_clean, "loss_max": self.loss_max,
            "sensitivity": self.sensitivity, "first_order_estimate": self.first_order_estimate,
            "final_distance": self.final_distance, "converged": self.converged,
            **({"patience": self.patience, "stopped_by": self.stopped_by} if self.patience is not None else {}),
        }


def converged(accuracy_trajectory: list[float]) -> bool:
    """No new minimum in the last quarter of the steps (acc_0..acc_T; T < 4 counts as converged
    only if the last step did not lower the accuracy)."""
    steps = len(accuracy_trajectory) - 1
    if steps < 1:
        return True
    cut = min(steps - 1, (3 * steps) // 4)
    return min(accuracy_trajectory[: cut + 1]) <= min(accuracy_trajectory)


def w_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
          steps: int = 50, step_ratio: float = 1.875, loss: LossName = "redlr",
          batch_size: int = 500, compute: Compute | None = None,
          progress: Callable[[int, int], None] | None = None,
          should_stop: Callable[[], bool] | None = None, keep_final: bool = False,
          start: torch.Tensor | None = None, patience: int | None = None, max_steps: int | None = None,
          keep_correct: bool = False) -> WPGDResult:
    """W-PGD on the whole set (x, y) with step α = step_ratio·δ/steps and no random start.

    `x` (N, C, H, W) in [0, 1] should already be on the compute device; `model` in eval mode.
    `progress(t, steps)` is called after each step; `should_stop()` every step ends the run
    early (the result then covers the steps done).

    Additions for the evaluation ensemble (core.engine.evaluation), none of which changes a
    default result: `start`, a perturbed copy of x to start from instead of x (projected into the
    ball first; acc_0 is then the start's accuracy, not the clean one); `patience`, adaptive steps:
    after the first `steps` steps the run goes on until `patience` steps in a row have brought no new
    minimum of the whole-set accuracy, up to max(`max_steps`, steps + patience) (α stays
    ratio·δ/steps); `keep_correct`:
    the per-image correctness at the worst iterate (`correct`).
    """
    compute = compute or Compute.resolve(x.device, amp="off", channels_last=False)
    if loss == "kl":
        raise ValueError("W-PGD evaluation uses ce, dlr or redlr; kl needs a batch's clean logits")
    loss_fn: PerSampleLoss = attack_loss(loss)
    n = x.shape[0]
    alpha = step_ratio * threat.delta / steps
    # an adaptive run may always add `patience` steps after the nominal ones, so a cap at or below
    # the nominal count cannot by itself make it "not converged"
    limit = steps if patience is None else max(steps + patience, max_steps or 0)
    x_adv = x.clone() if start is None else threat.project(start.to(x.dtype), x)
    direction = torch.empty_like(x)
    dual = torch.empty(n, device=x.device, dtype=x.dtype)
    correct_per_step: list[torch.Tensor] = []
    loss_per_step: list[torch.Tensor] = []
    upsilon = torch.zeros((), device=x.device, dtype=torch.float64)
    tracker = _WorstIterate(n, x.device, threat) if keep_correct else None
    minimum = _RunningMinimum()

    steps_done = 0
    stopped_by = "steps" if patience is None else "cap"
    for t in range(1, limit + 1):
        correct = torch.zeros((), device=x.device, dtype=torch.int64)
        loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
        for b in batches(n, batch_size):
            g, logits, image_losses = input_gradient(model, x_adv[b], y[b], loss_fn, compute)
            hit = logits.argmax(dim=1) == y[b]
            if tracker is not None:
                tracker.now[b] = hit
            correct += hit.sum()
            loss_sum += image_losses.double().sum()
            d = threat.dual_norms(g)
            dual[b] = d
            direction[b] = threat.raw_direction(g, d)
        correct_per_step.append(correct)          # accuracy of X_{t-1}
        loss_per_step.append(loss_sum)
        if tracker is not None:
            tracker.update()
        norm = threat.normaliser(dual)           # N (= Υ at this iterate for W2 threats)
        if t == 1:
            upsilon = threat.sensitivity(dual)
        scale = (alpha / norm.clamp_min(1e-30)).to(x.dtype)
        x_adv = threat.project(x_adv.add_(direction * scale), x)
        steps_done = t
        if progress is not None:
            progress(t, limit)
        if should_stop is not None and should_stop():
            stopped_by = "request"
            break
        if patience is not None and minimum.since_new(threat.world.sum(correct)) >= patience and t >= steps:
            stopped_by = "patience"
            break

    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    for b in batches(n, batch_size):
        logits = predict(model, x_adv[b], compute)
        hit = logits.argmax(dim=1) == y[b]
        if tracker is not None:
            tracker.now[b] = hit
        correct += hit.sum()
        loss_sum += loss_fn(logits, y[b]).double().sum()
    correct_per_step.append(correct)
    loss_per_step.append(loss_sum)
    if tracker is not None:
        tracker.update()

    # one host synchronisation (and, across ranks, one all-reduce) for the whole run
    world = threat.world
    totals = world.sum(torch.cat([torch.stack(correct_per_step).double(), torch.stack(loss_per_step),
                                  torch.tensor([float(n)], device=x.device, dtype=torch.float64)]))
    k = len(correct_per_step)
    acc = (totals[:k] / totals[-1]).tolist()
    losses = (totals[k:2 * k] / totals[-1]).tolist()
    upsilon_f = float(upsilon)
    worst = min(range(len(acc)), key=lambda i: (acc[i], -i))
    return WPGDResult(
        delta=threat.delta, steps=steps_done, robust_accuracy=acc[worst], clean_accuracy=acc[0],
        accuracy_trajectory=acc, loss_trajectory=losses, loss_clean=losses[0], loss_max=max(losses),
        sensitivity=upsilon_f, first_order_estimate=losses[0] + threat.delta * upsilon_f,
        worst_step=worst, final_distance=threat.distance(x_adv, x),
        x_final=x_adv if keep_final else None,
        correct=tracker.best if tracker is not None else None,
        patience=patience, stopped_by=stopped_by,
    )


class _RunningMinimum:
    """How many steps ago the whole-set count of correct images last reached a new minimum (the
    adaptive stop; one host synchronisation per step, which only an adaptive run pays)."""

    def __init__(self) -> None:
        self.best: int | None = None
        self.age = 0

    def since_new(self, count: torch.Tensor) -> int:
        value = int(count)
        if self.best is None or value < self.best:
            self.best, self.age = value, 0
        else:
            self.age += 1
        return self.age


class _WorstIterate:
    """The per-image correctness at the iterate with the fewest correct images (the latest among
    ties, as W-PGD's `worst_step`), kept on the device without a host synchronisation."""

    def __init__(self, n: int, device: torch.device, threat: Threat) -> None:
        self.now = torch.zeros(n, dtype=torch.bool, device=device)
        self.best = torch.ones(n, dtype=torch.bool, device=device)
        self.count = torch.full((), 2 ** 62, dtype=torch.int64, device=device)   # above any set's size
        self.world = threat.world

    def update(self) -> None:
        count = self.world.sum(self.now.sum())
        better = count <= self.count
        self.best = torch.where(better, self.now, self.best)
        self.count = torch.where(better, count, self.count)


def w_fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
           loss: LossName = "redlr", batch_size: int = 500, compute: Compute | None = None,
           clip: bool = True) -> torch.Tensor:
    """The first-order map T(x_i) = x_i + δ·d_i: spends the whole budget (FGSM for pointwise threats).

    With clip=False the result is not clipped to [0, 1], so D(T(X), X) = δ exactly.
    """
    compute = compute or Compute.resolve(x.device, amp="off", channels_last=False)
    loss_fn = attack_loss(loss)
    direction = torch.empty_like(x)
    dual = torch.empty(x.shape[0], device=x.device, dtype=x.dtype)
    for b in batches(x.shape[0], batch_size):
        g, _, _ = input_gradient(model, x[b], y[b], loss_fn, compute)
        dual[b] = threat.dual_norms(g)
        direction[b] = threat.raw_direction(g, dual[b])
    moved = x + direction * (threat.delta / threat.normaliser(dual).clamp_min(1e-30)).to(x.dtype)
    return moved.clamp(0.0, 1.0) if clip else moved


def allocate_budget(cost: torch.Tensor, delta: torch.Tensor, threat: Threat) -> torch.Tensor:
    """Sizes s_i ≥ 0 with mean_i s_i² ≤ δ² over the (global) batch, given each point's wanted size
    `cost` (inf: none): the cheapest points first get all they want, the next one what is left,
    the rest nothing. Across ranks the order is global; this rank's sizes come back."""
    n_local = cost.shape[0]
    world = threat.world
    if world.distributed:   # shards may differ by one: pad each to the largest with inf (wants nothing)
        counts = world.gather(torch.tensor([n_local], device=cost.device))
        n_max, n_total = int(counts.max()), int(counts.sum())
        padded = torch.full((n_max,), float("inf"), device=cost.device, dtype=cost.dtype)
        padded[:n_local] = cost
        wanted = world.gather(padded).double()
    else:
        n_max, n_total, wanted = n_local, n_local, cost.double()
    order = torch.argsort(wanted)
    want = wanted[order]
    finite = torch.isfinite(want)
    sq = torch.where(finite, want.square(), torch.zeros_like(want))
    cum = torch.cumsum(sq, 0)
    total = n_total * delta.double().to(cum.device).square()
    full = finite & (cum <= total)
    # the first point that does not fit whole gets what the points ahead of it left
    first_short = finite & ~full & torch.cat([torch.ones(1, dtype=torch.bool, device=cum.device), full[:-1]])
    rest = (total - (cum - sq)).clamp_min(0).sqrt()
    size_sorted = torch.where(full, want, torch.where(first_short, rest, torch.zeros_like(rest)))
    sizes = torch.empty_like(size_sorted)
    sizes[order] = size_sorted
    if world.distributed:
        sizes = sizes[world.rank * n_max: world.rank * n_max + n_local]
    return sizes.to(cost.dtype)


def allocation_step(threat: Threat, g: torch.Tensor, dual: torch.Tensor, loss: torch.Tensor,
                    delta: torch.Tensor, overshoot: float) -> torch.Tensor:
    """The budget-allocating first step of fast W-TRADES (attack_schedule "allocate").

    A W2 ball lets the attack spend its budget unevenly. With a margin loss L ≤ 0 on correctly
    classified points (ReDLR, DLR), where L = 0 is the decision boundary, the first-order distance
    of point i to the boundary along the steepest-ascent direction u_i (‖u_i‖_r = 1) is
    t_i = −L_i / ‖g_i‖_s. The points closest to it are moved γ·t_i along u_i (γ > 1 overshoots the
    linear estimate), cheapest first, until mean_i ‖e_i‖_r² reaches δ_B²; misclassified and flat
    points stay. Returns the perturbation e."""
    if not threat.distributional:
        raise ValueError("the allocation step needs a Wasserstein threat (a pointwise ball has no budget to share)")
    live = (loss < 0) & (dual > 0)
    never = torch.full(dual.shape, float("inf"), device=dual.device, dtype=torch.float64)
    reach = torch.where(live, -loss.double() / dual.double().clamp_min(1e-30), never)
    sizes = allocate_budget(overshoot * reach, delta, threat).to(g.dtype)
    return threat.unit_direction(g, dual) * sizes.reshape((-1,) + (1,) * (g.dim() - 1))


@dataclass
class BatchAttack:
    """The inner attack of W-TRADES on one batch (the batch is the set being normalised)."""

    x_adv: torch.Tensor
    sensitivity: torch.Tensor   # Υ_B from the first step's gradients (0-d, on the device)
    delta: torch.Tensor         # δ_B actually used (0-d, on the device)
    x_start: torch.Tensor | None = field(default=None, repr=False)  # a given start, re-projected into δ_B


def attack_batch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
                 loss_fn: PerSampleLoss, steps: int, step_ratio: float, compute: Compute,
                 budget: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 start_noise: float = 0.0, generator: torch.Generator | None = None,
                 start: torch.Tensor | None = None, allocate: float | None = None) -> BatchAttack:
    """K steps of W-PGD (or PGD for a pointwise threat) on one batch, model in eval mode.

    `budget(Υ_B) -> δ_B` picks the radius after the first gradient (W-PGD-Budget); None keeps δ.
    `start_noise` > 0 starts from x + start_noise·N(0, I) (needed for the KL loss, whose
    gradient vanishes at x' = x). `start`: a perturbation to start from instead of x (the fast
    schedule's memory); the first gradient is taken at x + start (it gives Υ_B and so δ_B),
    then the start is re-projected into the δ_B ball (`x_start` of the result) before the
    first step is added to it.
    """
    base = x if start is None else (x + start.to(x.dtype)).clamp(0.0, 1.0)
    x_adv = base
    if start_noise > 0:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = (base + start_noise * noise).clamp(0.0, 1.0)
    delta_b = torch.tensor(threat.delta, device=x.device, dtype=torch.float64)
    upsilon_b = torch.zeros((), device=x.device, dtype=torch.float64)
    x_start = None
    for t in range(steps):
        g, _, loss = input_gradient(model, x_adv, y, loss_fn, compute)
        dual = threat.dual_norms(g)
        if t == 0:
            upsilon_b = threat.sensitivity(dual)
            if budget is not None:
                delta_b = budget(upsilon_b)
            if start is not None:
                x_adv = x_start = threat.project(x_adv, x, delta_b.to(x.dtype))
            if allocate is not None:
                x_adv = threat.project(x_adv + allocation_step(threat, g, dual, loss, delta_b, allocate), x,
                                       delta_b.to(x.dtype))
                continue
        alpha = step_ratio * delta_b / steps
        scale = (alpha / threat.normaliser(dual).clamp_min(1e-30)).to(x.dtype)
        x_adv = threat.project(x_adv + threat.raw_direction(g, dual) * scale, x, delta_b.to(x.dtype))
    return BatchAttack(x_adv.detach(), upsilon_b, delta_b, x_start)
