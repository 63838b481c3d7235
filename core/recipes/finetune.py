"""W-TRADES fine-tuning, one readable recipe from top to bottom.

    load → estimate Ῡ → for each epoch: [attack batch (W-PGD-Budget) → CE + β·KL at randomly
    perturbed weights → SGD step] → held-out evaluation → checkpoint → keep the best

The split loss of the 2025 paper: the inner attack maximises `attack_loss` (ReDLR by default)
and the outer step minimises CE + β·KL(p(x) ‖ p(x')). Plain TRADES is the same loop with a
pointwise threat and attack_loss="kl". Formulas and defaults: docs/concepts.md.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from core.attacks.pgd import pgd
from core.attacks.wpgd import BatchAttack, attack_batch, w_pgd
from core.checkpoint import TrainingCheckpoint
from core.config import FinetuneConfig
from core.data import ImageData, augment_crop_flip, is_cifar_like, to_unit_float
from core.device import Compute, batches
from core.distributed import SINGLE, World, unwrap
from core.errors import ValidationError
from core.hooks import Hooks
from core.losses import attack_loss, kl_divergence
from core.oom import AdaptiveBatch, report_halving
from core.plots import training_curve_png
from core.threats import Threat


@dataclass
class FinetuneResult:
    best_epoch: int
    epochs_completed: int
    stopped: bool                       # should_stop() ended the run early
    before: dict[str, float]            # held-out metrics of the model that went in
    best: dict[str, float]
    last: dict[str, float]
    history: list[dict[str, Any]]
    best_model_state: dict[str, torch.Tensor] = field(repr=False)
    last_model_state: dict[str, torch.Tensor] = field(repr=False)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def report(self) -> dict[str, Any]:
        return {
            "type": "finetune", "config": self.config, "best_epoch": self.best_epoch,
            "epochs_completed": self.epochs_completed, "stopped": self.stopped,
            "before": self.before, "best": self.best, "last": self.last,
            "change": {k: self.best[k] - self.before[k] for k in self.best
                       if k in self.before and isinstance(self.best[k], (int, float))},
            "history": self.history,
        }

    def plot_png(self) -> bytes:
        rows = [{"epoch": 0, **self.before}] + [h for h in self.history if "clean_accuracy" in h]
        keys = [k for k in ("clean_accuracy", "w2_robust_accuracy", "linf_robust_accuracy",
                            "l2_robust_accuracy") if k in rows[0]]
        return training_curve_png([r["epoch"] for r in rows], {k: [r[k] for r in rows] for k in keys},
                                  "W-TRADES fine-tuning: held-out accuracy")


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def evaluate_heldout(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat,
                     config: FinetuneConfig, compute: Compute, seed: int,
                     batch: AdaptiveBatch | None = None,
                     should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Clean, W2 (W-PGD-ReDLR) and pointwise (PGD) accuracy on the held-out slice (the batch
    halves on a CUDA out-of-memory error). `should_stop` cuts both attacks short (the numbers
    are then not to be kept)."""
    model.eval()
    batch = batch or AdaptiveBatch(max(config.batch_size, 256))
    w2 = threat.w2
    wres = batch.run("held-out w-pgd", lambda size: w_pgd(model, x, y, w2, steps=config.eval_wpgd_steps,
                                                          loss="redlr", batch_size=size, compute=compute,
                                                          should_stop=should_stop))
    pres = batch.run("held-out pgd", lambda size: pgd(
        model, x, y, threat.pointwise, steps=config.eval_pgd_steps, loss="ce", batch_size=size, compute=compute,
        generator=torch.Generator(device=compute.device).manual_seed(seed), should_stop=should_stop))
    clean = wres.clean_accuracy
    name = f"{threat.ground}_robust_accuracy"
    return {
        "clean_accuracy": clean,
        "w2_robust_accuracy": wres.robust_accuracy,
        name: pres.robust_accuracy,
        "w2_robust_to_clean_ratio": wres.ratio,
        f"{threat.ground}_robust_to_clean_ratio": pres.robust_accuracy / clean if clean > 0 else 0.0,
        "sensitivity": wres.sensitivity,
    }


def estimate_global_sensitivity(model: torch.nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
                                threat: Threat, config: FinetuneConfig, compute: Compute,
                                generator: torch.Generator, augment: bool) -> torch.Tensor:
    """Ῡ on a random subset of the training images (uint8, on the device), augmented as the
    training batches are: (mean_i ‖g_i‖_s²)^{1/2} of the attack loss at the start point."""
    model.eval()
    idx = torch.randperm(train_x.shape[0], generator=generator, device=train_x.device)[: config.budget_subset]
    x_all, y_all = train_x[idx], train_y[idx]
    squares = torch.zeros((), device=compute.device, dtype=torch.float64)
    for b in batches(x_all.shape[0], config.batch_size):
        x = to_unit_float(x_all[b], compute.device)
        if augment:
            x = augment_crop_flip(x, generator=generator)
        x = compute.images(x)
        attack = attack_batch(model, x, y_all[b], threat.with_delta(0.0),
                              loss_fn=_attack_loss_fn(model, x, config, compute), steps=1,
                              step_ratio=1.0, compute=compute, start_noise=_start_noise(config),
                              generator=generator)
        squares += attack.sensitivity.square() * (b.stop - b.start)
    return (squares / x_all.shape[0]).sqrt()


def _start_noise(config: FinetuneConfig) -> float:
    return 0.001 if config.attack_loss == "kl" else 0.0


def _attack_loss_fn(model: torch.nn.Module, x: torch.Tensor, config: FinetuneConfig, compute: Compute):
    if config.attack_loss != "kl":
        return attack_loss(config.attack_loss)
    with torch.no_grad(), compute.autocast():   # the clean softmax, once per batch
        return attack_loss("kl", logits_clean=model(compute.images(x)).float())


class RandomWeightPerturbation:
    """W ← W + γ·‖W‖_F·ξ/‖ξ‖_F on every weight with more than one dimension; `restore` undoes it."""

    def __init__(self, model: torch.nn.Module, gamma: float) -> None:
        self.gamma = gamma
        self.params = [p for p in model.parameters() if p.dim() > 1 and p.requires_grad]
        self.saved: list[torch.Tensor] = []

    @torch.no_grad()
    def apply(self, generator: torch.Generator) -> None:
        if self.gamma <= 0 or not self.params:
            return
        self.saved = [p.detach().clone() for p in self.params]
        noise = [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for p in self.params]
        w_norms = torch._foreach_norm(self.params)
        n_norms = torch._foreach_norm(noise)
        scales = [self.gamma * w / n.clamp_min(1e-12) for w, n in zip(w_norms, n_norms)]
        torch._foreach_mul_(noise, scales)
        torch._foreach_add_(self.params, noise)

    @torch.no_grad()
    def restore(self) -> None:
        if self.saved:
            torch._foreach_copy_(self.params, self.saved)
            self.saved = []


def w_trades_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  *, threat: Threat, config: FinetuneConfig, compute: Compute,
                  perturbation: RandomWeightPerturbation, generator: torch.Generator,
                  upsilon_ema: torch.Tensor | None) -> tuple[torch.Tensor, BatchAttack, torch.Tensor | None]:
    """One W-TRADES step on a batch (the scheduler is the caller's).

    Inner attack in eval mode with the split loss; with `upsilon_ema` = Ῡ the batch gets
    δ_B = δ·Υ_B/Ῡ clamped to [0, cap·δ] (W-PGD-Budget), with None the fixed δ. Outer step:
    CE + β·KL(p(x) ‖ p(x')) in train mode, its gradient taken at randomly perturbed weights.
    Returns the detached loss, the attack, and the updated Ῡ (None when fixed).
    Across ranks (`model` wrapped by World.wrap, `threat` across the world) x, y are this rank's
    shard of the global batch: the attack runs on the bare module with Υ_B and δ_B over the global
    batch, DDP averages the outer gradients, and the returned loss is the global batch's.
    """
    bare = unwrap(model)
    model.eval()
    budget = None
    if upsilon_ema is not None:
        ema = upsilon_ema

        def budget(upsilon_b: torch.Tensor) -> torch.Tensor:
            delta_b = threat.delta * upsilon_b / ema.clamp_min(1e-30)
            delta_b = torch.where(ema > 0, delta_b, torch.full_like(delta_b, threat.delta))
            return delta_b.clamp(0.0, config.budget_cap * threat.delta)

    adv = attack_batch(bare, x, y, threat, loss_fn=_attack_loss_fn(bare, x, config, compute),
                       steps=config.attack_steps, step_ratio=config.attack_step_ratio, compute=compute,
                       budget=budget, start_noise=_start_noise(config), generator=generator)
    if upsilon_ema is not None:
        upsilon_ema = config.budget_ema_decay * upsilon_ema + (1 - config.budget_ema_decay) * adv.sensitivity

    model.train()
    perturbation.apply(generator)
    with compute.autocast():
        logits_nat = model(x)
        logits_adv = model(adv.x_adv)
    loss = F.cross_entropy(logits_nat.float(), y) + config.beta * kl_divergence(logits_nat, logits_adv).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    perturbation.restore()
    optimizer.step()
    return threat.world.mean(loss.detach()), adv, upsilon_ema


def finetune(config: FinetuneConfig, model: torch.nn.Module, data: ImageData, hooks: Hooks | None = None,
             *, device: str | torch.device | None = None,
             resume: TrainingCheckpoint | None = None, world: World = SINGLE) -> FinetuneResult:
    """`world`: run as one rank of several (core.distributed); every rank calls this with the same
    arguments, trains on its shard of each global batch and evaluates its shard of the held-out slice."""
    hooks = hooks or Hooks()
    compute = Compute.resolve(device, config.amp, config.channels_last)
    threat = Threat.from_spec(config.threat_model).across(world)
    model = compute.prepare_model(model)
    generator = torch.Generator(device=compute.device).manual_seed(config.seed)

    # --- data: training images stay uint8 on the device; the held-out slice as floats ---------
    train_x = data.train_x.to(compute.device)
    train_y = data.train_y.to(compute.device)
    if config.train_examples is not None:
        train_x, train_y = train_x[: config.train_examples], train_y[: config.train_examples]
    n_train = train_x.shape[0]
    eval_x = compute.images(to_unit_float(world.shard(data.test_x[: config.eval_examples]), compute.device))
    eval_y = world.shard(data.test_y[: config.eval_examples]).to(compute.device)
    augment = config.augment == "crop_flip" or (config.augment == "auto" and is_cifar_like(data.image_shape))
    batch_size = min(config.batch_size, n_train)
    steps_per_epoch = max(1, n_train // batch_size)       # drop the last partial batch (BN needs > 1)
    if batch_size % world.size:
        raise ValidationError(f"batch_size {batch_size} does not split evenly over {world.size} devices; "
                              "use a multiple of the device count.")
    total_steps = steps_per_epoch * config.epochs

    # --- optimiser, schedule, and the state a resume restores ------------------------------
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov and config.momentum > 0,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    perturbation = RandomWeightPerturbation(model, config.weight_perturbation)
    dynamic_budget = config.budget == "dynamic" and threat.distributional
    eval_batch = world.eval_batch(AdaptiveBatch(max(config.batch_size, 256), report_halving(hooks.event)))

    if resume is None:
        hooks.progress(0.0, "evaluate", {"epoch": 0, "total_epochs": config.epochs})
        before = evaluate_heldout(model, eval_x, eval_y, threat, config, compute, seed=config.seed, batch=eval_batch,
                                  should_stop=hooks.should_stop)
        if hooks.should_stop():  # stopped before any training: nothing to keep
            state = _state_copy(model)
            return FinetuneResult(best_epoch=0, epochs_completed=0, stopped=True, before=before, best=before,
                                  last=before, history=[], best_model_state=state, last_model_state=state,
                                  config=config.model_dump(mode="json"))
        history: list[dict[str, Any]] = []
        best_epoch, best_metrics, best_state = 0, before, _state_copy(model)
        start_epoch = 0
        upsilon_ema = (estimate_global_sensitivity(model, train_x, train_y, threat, config, compute, generator,
                                                   augment)
                       if dynamic_budget else torch.zeros((), device=compute.device, dtype=torch.float64))
    else:
        model.load_state_dict(resume.model_state)
        optimizer.load_state_dict(resume.optimizer_state)
        scheduler.load_state_dict(resume.scheduler_state)
        generator.set_state(resume.rng_state["generator"])
        extra = resume.extra
        before, history = extra["before"], list(extra["history"])
        best_epoch, best_metrics = extra["best_epoch"], extra["best_metrics"]
        best_state = resume.best_model_state
        start_epoch = resume.epoch
        upsilon_ema = torch.tensor(extra["upsilon_ema"], device=compute.device, dtype=torch.float64)
    partial = resume.extra.get("partial") if resume is not None else None   # stopped inside an epoch

    last_metrics = history[-1] if history else before
    trainer = world.wrap(model)   # DDP across ranks; the model itself in one process
    stopped = False
    epoch = start_epoch
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=compute.device, dtype=torch.float64)
        budget_sum = torch.zeros((), device=compute.device, dtype=torch.float64)
        steps_done = 0
        if partial is None:
            epoch_rng = generator.get_state()
            perm = torch.randperm(n_train, generator=generator, device=compute.device)
        else:
            # replay this epoch's shuffle, then continue from where the stopped run left off
            epoch_rng = resume.rng_state["epoch_start"]
            generator.set_state(epoch_rng)
            perm = torch.randperm(n_train, generator=generator, device=compute.device)
            generator.set_state(resume.rng_state["generator"])
            steps_done = partial["steps_done"]
            loss_sum += partial["loss_sum"]
            budget_sum += partial["budget_sum"]
            partial = None
        for step in range(steps_done, steps_per_epoch):
            idx = perm[step * batch_size:(step + 1) * batch_size]
            x = to_unit_float(train_x[idx], compute.device)
            y = train_y[idx]
            if augment:
                x = augment_crop_flip(x, generator=generator)
            x, y = world.shard(compute.images(x)), world.shard(y)   # augmented as one batch, then split

            loss, adv, new_ema = w_trades_step(
                trainer, optimizer, x, y, threat=threat, config=config, compute=compute,
                perturbation=perturbation, generator=generator,
                upsilon_ema=upsilon_ema if dynamic_budget else None)
            if new_ema is not None:
                upsilon_ema = new_ema
            budget_sum += adv.delta
            scheduler.step()
            loss_sum += loss.double()
            steps_done = step + 1

            if step % 5 == 4 or step == steps_per_epoch - 1:
                done = (epoch - 1 + steps_done / steps_per_epoch) / config.epochs
                hooks.progress(done, "train", {"epoch": epoch, "total_epochs": config.epochs,
                                               "step": steps_done, "total_steps": steps_per_epoch})
                if hooks.should_stop():
                    stopped = True
                    break

        train_loss = float(loss_sum / max(steps_done, 1))
        if not stopped:
            hooks.progress((epoch - 0.05) / config.epochs, "evaluate", {"epoch": epoch, "total_epochs": config.epochs})
            metrics = evaluate_heldout(model, eval_x, eval_y, threat, config, compute, seed=config.seed + epoch,
                                       batch=eval_batch, should_stop=hooks.should_stop)
            # Stopped during the evaluation: its numbers are cut short, so stop as inside the epoch
            # (all its steps done); a resumed run evaluates this epoch again.
            stopped = hooks.should_stop()
        if stopped:
            # everything needed to finish this epoch exactly as an uninterrupted run would
            hooks.checkpoint(TrainingCheckpoint(
                epoch=epoch - 1, model_state=_state_copy(model), best_model_state=best_state,
                optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                rng_state={"generator": generator.get_state(), "epoch_start": epoch_rng},
                metrics={"train_loss": train_loss},
                extra={"before": before, "history": history, "best_epoch": best_epoch,
                       "best_metrics": best_metrics, "upsilon_ema": float(upsilon_ema),
                       "partial": {"epoch": epoch, "steps_done": steps_done, "loss_sum": float(loss_sum),
                                   "budget_sum": float(budget_sum)}},
                total_epochs=config.epochs, final=True))
            epoch -= 1
            break

        row = {"epoch": epoch, "train_loss": train_loss, **metrics,
               "mean_batch_delta": float(budget_sum / max(steps_done, 1)),
               "upsilon_ema": float(upsilon_ema), "lr": scheduler.get_last_lr()[0],
               "seconds": time.perf_counter() - t0}
        history.append(row)
        last_metrics = row
        is_best = metrics["w2_robust_accuracy"] > best_metrics["w2_robust_accuracy"] or best_epoch == 0
        if is_best:
            best_epoch, best_metrics, best_state = epoch, row, _state_copy(model)
        hooks.checkpoint(TrainingCheckpoint(
            epoch=epoch, model_state=_state_copy(model), best_model_state=best_state,
            optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
            rng_state={"generator": generator.get_state()}, metrics=row, is_best=is_best,
            extra={"before": before, "history": history, "best_epoch": best_epoch,
                   "best_metrics": best_metrics, "upsilon_ema": float(upsilon_ema)},
            total_epochs=config.epochs, final=epoch == config.epochs))
        hooks.progress(epoch / config.epochs, "train", {"epoch": epoch, "total_epochs": config.epochs,
                                                        **{k: row[k] for k in row if k != "epoch"}})

    return FinetuneResult(
        best_epoch=best_epoch, epochs_completed=epoch, stopped=stopped, before=before,
        best=best_metrics, last=last_metrics, history=history,
        best_model_state=best_state, last_model_state=_state_copy(model),
        config=config.model_dump(mode="json"),
    )
