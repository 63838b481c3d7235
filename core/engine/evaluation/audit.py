"""The masking audit: checks that a robust accuracy is a measurement and not an artefact of
gradients the attacks cannot use ("Obfuscated Gradients Give a False Sense of Security";
"On Evaluating Adversarial Robustness"). Each check is {"check", "status", "detail"} with status
"pass", "warn" or "fail" and a one-line explanation with the numbers.

The checks (masking_audit runs the first five; B2's fine-tune adds transfer_check):
- radius: robust accuracy is non-increasing as δ grows (W-PGD-ReDLR with the quick preset's
  patience at δ/2 and 2δ, around the reported number at δ), and falls at all over that 4× range;
- steps: the reported attack is no weaker than a short run of the same attack (T/5 steps);
- random: the best of several random W2 perturbations of size δ (a black-box random search)
  hurts far less than the attack; stronger than the attack means the attack is blind;
- agreement: the ensemble's W-PGD attacks with the same loss from different starts (the clean
  images, a random point of the ball) agree within a tolerance;
- gradients: zero or non-finite input gradients of the cross-entropy on a large share of the
  correctly classified images (a quantised input or saturated logits);
- members: the W2 attacks are no weaker than the pointwise attack whose set lies in their ball;
- transfer (fine-tunes): an attack crafted on the input model and transferred to the fine-tuned
  model is weaker than the white-box attack on it.
Tolerances are in accuracy units, at least two images or one point: TOLERANCE.

For B2 (fine-tuning): `masking_audit(model, x, y, threat.w2, ensemble=after_result, ...)` on the
chosen checkpoint, plus `transfer_check(input_model, finetuned_model, x, y, threat.w2,
white_box_accuracy=after_result.robust_accuracy, ...)` appended to its list; `audit_status(checks)`
is the worst status.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from core.engine.attacks.common import input_gradient
from core.engine.attacks.wpgd import w_pgd
from core.engine.device import Compute, batches
from core.engine.evaluation.ensemble import (
    PRESETS,
    REDLR,
    W2EnsembleResult,
    clean_predictions,
    random_w2_start,
    w2_ensemble,
)
from core.engine.evaluation.intervals import share
from core.engine.losses import cross_entropy
from core.engine.oom import AdaptiveBatch
from core.engine.threats import Threat

__all__ = ["audit_status", "masking_audit", "transfer_check"]

RANDOM_DRAWS = 8            # random W2 sets of size δ tried by the random search
AGREE_WARN, AGREE_FAIL = 0.05, 0.25   # spread of the attacks' accuracies beyond the binomial tolerance
GRADIENT_WARN, GRADIENT_FAIL = 0.10, 0.50   # share of correct images with zero or non-finite gradients


def tolerance(n: int) -> float:
    """Two images or one point, whichever is larger: differences below are noise."""
    return max(2.0 / max(n, 1), 0.01)


def _check(name: str, status: str, detail: str) -> dict[str, str]:
    return {"check": name, "status": status, "detail": detail}


def audit_status(checks: list[dict[str, Any]]) -> str:
    """The worst status of the checks ("pass" when there are none)."""
    order = {"pass": 0, "warn": 1, "fail": 2}
    return max((c["status"] for c in checks), key=order.__getitem__, default="pass")


def masking_audit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
                  ensemble: W2EnsembleResult, compute: Compute, batch_size: int | AdaptiveBatch = 256,
                  seed: int = 0, steps: int = 50, step_ratio: float = 1.875, pointwise_accuracy: float | None = None,
                  progress: Callable[[float, str], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> list[dict[str, str]]:
    """The audit of `ensemble` (the W2 result at `threat`, a W2 threat, on (x, y)); module docstring.
    `pointwise_accuracy`: the pointwise robust accuracy at the same δ, if measured."""
    batch = batch_size if isinstance(batch_size, AdaptiveBatch) else AdaptiveBatch(int(batch_size))
    n = int(x.shape[0])
    tol = tolerance(n)
    say = progress or (lambda fraction, phase: None)
    checks = []
    short_steps = max(1, steps // 5)
    # where each check starts, by its passes: two W-PGD runs of about steps + patience, the short
    # run, the random draws (forward passes only) and one gradient
    cost = [2 * (steps + PRESETS["quick"].patience), short_steps, RANDOM_DRAWS / 3, 1]
    mark = [sum(cost[:i]) / sum(cost) for i in range(len(cost))]
    say(0.0, "audit: radius")
    # the reference attack alone (W-PGD-ReDLR, the quick preset's patience): the check is about the
    # attack's behaviour across radii, and the cross-entropy attack would double its cost
    def radius_run(i: int) -> Callable[[float, str], None]:
        return lambda f, phase: say(mark[1] * (i + f) / 2, "audit: radius")

    around = [w2_ensemble(model, x, y, threat.with_delta(d), preset="quick", batch_size=batch, compute=compute,
                          seed=seed, steps=steps, step_ratio=step_ratio, attacks=[REDLR], progress=radius_run(i),
                          should_stop=should_stop).robust_accuracy
              for i, d in enumerate((threat.delta / 2, 2 * threat.delta))]
    checks.append(_radius_check((around[0], ensemble.robust_accuracy, around[1]), threat.delta, tol))
    say(mark[1], "audit: steps")

    def short_run(t: int, total: int) -> None:
        say(mark[1] + (mark[2] - mark[1]) * t / total, "audit: steps")

    short = batch.run("audit: short w-pgd", lambda size: w_pgd(
        model, x, y, threat, steps=short_steps, step_ratio=step_ratio, loss="redlr", batch_size=size,
        compute=compute, should_stop=should_stop, progress=short_run)).robust_accuracy
    checks.append(_steps_check(ensemble.robust_accuracy, short, short_steps, tol))
    say(mark[2], "audit: random search")
    checks.append(_random_check(model, x, y, threat, ensemble, batch, compute, seed, tol))
    checks.append(_agreement_check(ensemble, tol))
    say(mark[3], "audit: gradients")
    checks.append(gradient_check(model, x, y, ensemble.clean_correct, batch, compute))
    if pointwise_accuracy is not None:
        checks.append(_members_check(ensemble, pointwise_accuracy, tol))
    return checks


def _radius_check(acc: tuple[float, float, float], delta: float, tol: float) -> dict[str, str]:
    half, at, double = acc
    numbers = f"{half:.3f} at δ/2, {at:.3f} at δ={delta:.4g}, {double:.3f} at 2δ"
    if at > half + tol or double > at + tol:
        return _check("radius", "fail", f"robust accuracy rises with the radius ({numbers}): the attack is "
                                        "not finding what a larger ball contains")
    if half - double < tol and half > tol:
        return _check("radius", "warn", f"robust accuracy does not fall over a 4x range of radii ({numbers}): "
                                        "the attack may not move the predictions at all")
    return _check("radius", "pass", f"robust accuracy falls as δ grows ({numbers})")


def _steps_check(reported: float, short: float, short_steps: int, tol: float) -> dict[str, str]:
    numbers = f"{reported:.3f} reported, {short:.3f} after {short_steps} steps of W-PGD-ReDLR"
    if reported > short + tol:
        return _check("steps", "fail", f"more steps gave a higher robust accuracy ({numbers})")
    return _check("steps", "pass", f"more steps give no higher robust accuracy ({numbers})")


def _random_check(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat,
                  ensemble: W2EnsembleResult, batch: AdaptiveBatch, compute: Compute, seed: int,
                  tol: float) -> dict[str, str]:
    generator = torch.Generator(device=x.device).manual_seed(seed + 1)
    best = 1.0
    for _ in range(RANDOM_DRAWS):
        noisy = random_w2_start(x, threat, generator, 1.0)
        pred = batch.run("audit: random search",
                         functools.partial(clean_predictions, model, noisy, compute=compute))
        best = min(best, share(pred == y))
    clean, attacked = ensemble.clean_accuracy, ensemble.robust_accuracy
    numbers = (f"clean {clean:.3f}, best of {RANDOM_DRAWS} random W2 perturbations of size δ {best:.3f}, "
               f"attack {attacked:.3f}")
    if best < attacked - tol:
        return _check("random", "fail", f"random perturbations fool more images than the attack ({numbers}): "
                                        "the gradients the attack follows are masked")
    if clean - best > 0.5 * (clean - attacked) and clean - attacked > tol:
        return _check("random", "warn", f"random perturbations do more than half of the attack's damage ({numbers})")
    return _check("random", "pass", f"random perturbations hurt far less than the attack ({numbers})")


def _agreement_check(ensemble: W2EnsembleResult, tol: float) -> dict[str, str]:
    """Attacks with the same loss from different starts must agree. Attacks with different losses
    need not: in a W2 ball cross-entropy W-PGD is structurally weaker than ReDLR (its gradients are
    largest on images already fooled, so the shared budget goes there), which is no sign of masking;
    a saturated softmax shows in the gradient check instead."""
    by_loss: dict[str, list[tuple[str, float]]] = {}
    for o in ensemble.attacks:
        loss = o.loss or o.name
        by_loss.setdefault(loss, []).append((o.name, o.robust_accuracy))
    groups = [g for g in by_loss.values() if len(g) > 1]
    if not groups:
        return _check("agreement", "pass", "one start per loss: nothing to compare")
    spread, group = max(((max(a for _, a in g) - min(a for _, a in g)), g) for g in groups)
    numbers = ", ".join(f"{k} {v:.3f}" for k, v in group)
    if spread > AGREE_FAIL + tol:
        return _check("agreement", "fail", f"the same attack from different starts disagrees by {spread:.3f} "
                                           f"({numbers}): the loss surface is too flat or noisy to climb")
    if spread > AGREE_WARN + tol:
        return _check("agreement", "warn",
                      f"the same attack from different starts disagrees by {spread:.3f} ({numbers})")
    return _check("agreement", "pass", f"the attacks from different starts agree within {spread:.3f} ({numbers})")


def gradient_check(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor,
                   batch: AdaptiveBatch, compute: Compute) -> dict[str, str]:
    """The share of correctly classified images whose cross-entropy input gradient is all zero or
    has a non-finite entry."""
    def shares(size: int) -> torch.Tensor:
        bad = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for b in batches(x.shape[0], size):
            g, _, _ = input_gradient(model, x[b], y[b], cross_entropy, compute)
            flat = g.flatten(1)
            bad[b] = (flat == 0).all(dim=1) | ~torch.isfinite(flat).all(dim=1)
        return bad

    bad = batch.run("audit: gradients", shares)
    total = int(correct.sum())
    share = float((bad & correct.to(bad.device)).sum()) / total if total else 0.0
    detail = f"{share:.1%} of the {total} correctly classified images have zero or non-finite input gradients"
    if share > GRADIENT_FAIL:
        return _check("gradients", "fail", detail + " (a quantised input or saturated logits hide the gradient)")
    if share > GRADIENT_WARN:
        return _check("gradients", "warn", detail)
    return _check("gradients", "pass", detail)


def _members_check(ensemble: W2EnsembleResult, pointwise: float, tol: float) -> dict[str, str]:
    strongest = min((o.robust_accuracy for o in ensemble.attacks), default=1.0)
    numbers = f"W2 attacks {strongest:.3f}, pointwise attack {pointwise:.3f}"
    if strongest > pointwise + tol:
        return _check("members", "warn", f"the W2 attacks are weaker than the pointwise attack whose set lies in "
                                          f"their ball ({numbers}); the W2 number is the pointwise one")
    return _check("members", "pass", f"the W2 attacks are at least as strong as the pointwise attack ({numbers})")


def transfer_check(source: torch.nn.Module, target: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                   threat: Threat, *, white_box_accuracy: float, compute: Compute,
                   batch_size: int | AdaptiveBatch = 256, steps: int = 50, step_ratio: float = 1.875) -> dict[str, str]:
    """W-PGD-ReDLR crafted on `source` (the input model of a fine-tune) and applied to `target` (the
    fine-tuned model): the transferred set must fool no more images than the white-box attack on
    `target` (whose accuracy is `white_box_accuracy`). Both models in eval mode."""
    batch = batch_size if isinstance(batch_size, AdaptiveBatch) else AdaptiveBatch(int(batch_size))
    crafted = batch.run("audit: transfer", lambda size: w_pgd(
        source, x, y, threat, steps=steps, step_ratio=step_ratio, loss="redlr", batch_size=size,
        compute=compute, keep_final=True))
    assert crafted.x_final is not None
    x_final = crafted.x_final
    pred = batch.run("audit: transfer", lambda size: clean_predictions(target, x_final, size, compute))
    transferred = share(pred == y)
    tol = tolerance(int(x.shape[0]))
    numbers = f"transferred from the input model {transferred:.3f}, white-box {white_box_accuracy:.3f}"
    if transferred < white_box_accuracy - tol:
        return _check("transfer", "fail", f"an attack crafted on the input model fools the fine-tuned model more "
                                          f"than the white-box attack ({numbers}): its gradients are masked")
    return _check("transfer", "pass", f"the transferred attack is weaker than the white-box one ({numbers})")
