"""W-TRADES fine-tuning, one readable recipe from top to bottom.

    load → carve a validation split out of the training set → evaluate the input (epoch 0) →
    estimate Ῡ → for each epoch: [attack batch (W-PGD-Budget) → CE + β·KL at randomly
    perturbed weights → SGD step] → validation → checkpoint → keep the best (epoch 0 included)
    → the before/after numbers on the test set

With attack_schedule "memory" (fast W-TRADES) each batch's attack starts from its images'
perturbations of the previous epoch (PerturbationMemory), re-projected into the batch's δ_B, and
takes attack_steps (default 1) steps. The memory is not checkpointed: a resumed run starts it
empty (its first epoch attacks from the clean images, as the first epoch of any run does).
With attack_schedule "allocate" (fast W-TRADES) the attack's first step shares the batch's W2
budget out to the images nearest the decision boundary (core.engine.attacks.wpgd.allocation_step), and
takes attack_steps (default 1) steps in all.

The split loss of the 2025 paper: the inner attack maximises `attack_loss` (ReDLR by default)
and the outer step minimises CE + β·KL(p(x) ‖ p(x')). Plain TRADES is the same loop with a
pointwise threat and attack_loss="kl". Formulas and defaults: docs/concepts.md. The checkpoint
is chosen on the validation split only; the test set gives the reported before/after numbers
and nothing else.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from core.engine.attacks.pgd import pgd
from core.engine.attacks.wpgd import BatchAttack, attack_batch, w_pgd
from core.engine.checkpoint import TrainingCheckpoint
from core.engine.config import FinetuneConfig, SelectionRule
from core.engine.data.datasets import CropFlip, ImageData, augment_crop_flip, crop_flip_draw, is_cifar_like, to_unit_float
from core.engine.defaults import auto_eval_batch_size, few_steps_warning, resolve_finetune, validation_split_size
from core.engine.device import Compute, batches
from core.engine.distributed import SINGLE, World, unwrap
from core.errors import ValidationError
from core.engine.hooks import Hooks
from core.engine.losses import attack_loss, kl_divergence
from core.engine.data.npz import stratified_split
from core.engine.oom import AdaptiveBatch, report_halving
from core.engine.plots import training_curve_png
from core.engine.provenance import runtime_provenance, utc_timestamp
from core.engine.threats import Threat


@dataclass
class FinetuneResult:
    best_epoch: int                     # 0: no fine-tuned epoch beat the input model
    epochs_completed: int
    stopped: bool                       # should_stop() ended the run early
    before: dict[str, Any]              # test-set metrics of the model that went in
    after: dict[str, Any] | None        # test-set metrics of the best checkpoint (None: stopped early)
    validation: dict[str, Any]          # validation metrics: before, best, last
    history: list[dict[str, Any]]
    best_model_state: dict[str, torch.Tensor] = field(repr=False)
    last_model_state: dict[str, torch.Tensor] = field(repr=False)
    config: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def improved(self) -> bool:
        return self.best_epoch > 0

    @property
    def summary(self) -> dict[str, Any]:
        """Everything but the per-epoch history: the job's `result` (same field names as the report)."""
        change = None
        if self.after is not None:
            change = {k: self.after[k] - self.before[k] for k in _ACCURACY_KEYS
                      if isinstance(self.after.get(k), (int, float)) and isinstance(self.before.get(k), (int, float))}
        return {
            "type": "finetune", "improved": self.improved, "best_epoch": self.best_epoch,
            "epochs_completed": self.epochs_completed, "stopped": self.stopped,
            "threat_model": {"kind": self.before["threat_model"], "delta": self.before["delta"]},
            "before": self.before, "after": self.after, "change": change,
            "selection": self.selection, "validation": self.validation, "warnings": self.warnings,
            "config": self.config, "provenance": self.provenance,
        }

    @property
    def report(self) -> dict[str, Any]:
        return {**self.summary, "history": self.history}

    def plot_png(self) -> bytes:
        rows = [{"epoch": 0, **self.validation["before"]}] + [h for h in self.history if "clean_accuracy" in h]
        keys = [k for k in ("clean_accuracy", "w2_robust_accuracy", "linf_robust_accuracy",
                            "l2_robust_accuracy") if k in rows[0]]
        return training_curve_png([r["epoch"] for r in rows], {k: [r[k] for r in rows] for k in keys},
                                  "W-TRADES fine-tuning: validation accuracy (epoch 0 = the input)")


_ACCURACY_KEYS = ("clean_accuracy", "w2_robust_accuracy", "linf_robust_accuracy", "l2_robust_accuracy",
                  "w2_robust_to_clean_ratio", "linf_robust_to_clean_ratio", "l2_robust_to_clean_ratio")


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def evaluate_heldout(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat,
                     config: FinetuneConfig, compute: Compute, seed: int, *, test: bool = False,
                     batch: AdaptiveBatch | None = None,
                     should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Clean, W2 (W-PGD-ReDLR) and pointwise (PGD) accuracy on held-out images, labelled with
    the radius and threat models they measure and whether W-PGD converged. The validation
    split gets eval_*_steps every epoch; the reported test numbers (`test`) the stronger
    test_*_steps. The batch halves on a CUDA out-of-memory error; `should_stop` cuts both
    attacks short (the numbers are then not to be kept)."""
    model.eval()
    batch = batch or AdaptiveBatch(auto_eval_batch_size(compute.device.type, tuple(x.shape[1:])))
    w2 = threat.w2
    wpgd_steps = config.test_wpgd_steps if test else config.eval_wpgd_steps
    pgd_steps = config.test_pgd_steps if test else config.eval_pgd_steps
    wres = batch.run("held-out w-pgd", lambda size: w_pgd(model, x, y, w2, steps=wpgd_steps, loss="redlr",
                                                          batch_size=size, compute=compute, should_stop=should_stop))
    pres = batch.run("held-out pgd", lambda size: pgd(
        model, x, y, threat.pointwise, steps=pgd_steps, loss="ce", batch_size=size, compute=compute,
        generator=torch.Generator(device=compute.device).manual_seed(seed), should_stop=should_stop))
    clean = wres.clean_accuracy
    return {
        **threat.labels(), "n_examples": int(x.shape[0]),
        "clean_accuracy": clean,
        "w2_robust_accuracy": wres.robust_accuracy,
        f"{threat.ground}_robust_accuracy": pres.robust_accuracy,
        "w2_robust_to_clean_ratio": wres.ratio,
        f"{threat.ground}_robust_to_clean_ratio": pres.robust_accuracy / clean if clean > 0 else 0.0,
        "sensitivity": wres.sensitivity,
        "w2_converged": wres.converged,
    }


def estimate_global_sensitivity(model: torch.nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
                                threat: Threat, config: FinetuneConfig, compute: Compute,
                                generator: torch.Generator, augment: bool) -> torch.Tensor:
    """The starting Ῡ: the mean batch sensitivity Υ_B over batches of the training batch size
    drawn from a random subset of the training images (uint8, on the device), augmented as the
    training batches are. The running estimate averages the same quantity, Υ_B, so that the
    batch radii δ_B = δ·Υ_B/Ῡ average δ."""
    model.eval()
    idx = torch.randperm(train_x.shape[0], generator=generator, device=train_x.device)[: config.budget_subset]
    x_all, y_all = train_x[idx], train_y[idx]
    total = torch.zeros((), device=compute.device, dtype=torch.float64)
    count = 0
    for b in batches(x_all.shape[0], int(config.batch_size)):
        x = to_unit_float(x_all[b], compute.device)
        if augment:
            x = augment_crop_flip(x, generator=generator)
        x = compute.images(x)
        attack = attack_batch(model, x, y_all[b], threat.with_delta(0.0),
                              loss_fn=_attack_loss_fn(model, x, config, compute), steps=1,
                              step_ratio=1.0, compute=compute, start_noise=_start_noise(config),
                              generator=generator)
        total += attack.sensitivity
        count += 1
    return total / max(count, 1)


def _finest_step(config: FinetuneConfig, threat: Threat) -> float:
    """The smallest attack step the job takes on the model: the training attack's α = ratio·δ/K
    and, when evaluation runs in bf16 too, the held-out W-PGD's 1.875·δ/steps."""
    steps = [config.attack_step_ratio * threat.delta / config.attack_steps]
    if config.eval_amp == "bf16":
        steps.append(1.875 * threat.delta / max(config.eval_wpgd_steps, config.test_wpgd_steps))
    return min(steps)


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


class PerturbationMemory:
    """Fast W-TRADES (attack_schedule "memory"): each training image's last perturbation x' − x.

    One float16 tensor of the training images' shape on the compute device, indexed by the image's
    position in the fit split: 2 bytes per pixel (Fashion-MNIST's 48,000 fit images: 75 MB;
    CIFAR-10's 40,000: 246 MB), next to the uint8 images themselves (half that). Perturbations are
    kept in the un-augmented frame: `recall` moves them with the batch's crop and flip, `store`
    moves them back (pixels the crop cut away keep their older value). An image not yet attacked
    recalls zeros, i.e. starts at the clean image. Across ranks every rank holds the whole table
    and stores the whole global batch (gathered), so it equals the single process's.
    """

    def __init__(self, n: int, image_shape: tuple[int, ...], device: torch.device) -> None:
        self.table = torch.zeros((n, *image_shape), dtype=torch.float16, device=device)

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def remembered(self) -> int:
        """How many images have a perturbation stored (one that is not all zeros)."""
        return int((self.table != 0).flatten(1).any(dim=1).sum())

    def recall(self, idx: torch.Tensor, crop: CropFlip | None) -> torch.Tensor:
        """The stored perturbations of images `idx` (float32), in the frame of the augmented batch."""
        e = self.table[idx].float()
        return e if crop is None else crop.apply(e)

    def store(self, idx: torch.Tensor, e: torch.Tensor, crop: CropFlip | None) -> None:
        """Remember perturbations `e` (in the augmented batch's frame) of images `idx`."""
        e = e.detach().float()
        if crop is not None:
            e = crop.undo(e, into=self.table[idx].float())
        self.table[idx] = e.to(torch.float16)


def w_trades_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  *, threat: Threat, config: FinetuneConfig, compute: Compute,
                  perturbation: RandomWeightPerturbation, generator: torch.Generator,
                  upsilon_ema: torch.Tensor | None, start: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, BatchAttack, torch.Tensor | None]:
    """One W-TRADES step on a batch (the scheduler is the caller's).

    Inner attack in eval mode with the split loss. With `upsilon_ema` = Ῡ (W-PGD-Budget) the
    batch gets δ_B = δ·Υ_B/Ῡ clamped to [0, cap·δ] (δ when there is no estimate yet), and then
    Ῡ ← decay·Ῡ + (1 − decay)·min(Υ_B, cap·Ῡ) (Ῡ = Υ_B at first). Averaging the clamped Υ_B
    makes δ the fixed point of the mean δ_B even though Υ_B is heavy-tailed (the ReDLR gradient
    explodes near a decision boundary), and a short memory follows the model's sensitivity as it
    changes. With None the fixed δ. `start` (the memory schedule): the attack starts at x + start,
    re-projected into the δ_B ball, instead of at x. Outer step: CE + β·KL(p(x) ‖ p(x')) in train mode, its
    gradient taken at randomly perturbed weights. Returns the detached loss, the attack, and the
    updated Ῡ (None when fixed).
    Across ranks (`model` wrapped by World.wrap, `threat` across the world) x, y are this rank's
    shard of the global batch: the attack runs on the bare module with Υ_B and δ_B over the global
    batch, DDP averages the outer gradients, and the returned loss is the global batch's.
    """
    bare = unwrap(model)
    model.eval()
    budget = None
    updated: dict[str, torch.Tensor] = {}
    if upsilon_ema is not None:
        prior = upsilon_ema
        decay, cap = config.budget_ema_decay, config.budget_cap

        def budget(upsilon_b: torch.Tensor) -> torch.Tensor:
            known = prior > 0
            delta_b = torch.where(known, threat.delta * upsilon_b / prior.clamp_min(1e-30),
                                  torch.full_like(upsilon_b, threat.delta))
            seen = torch.minimum(upsilon_b, cap * prior)
            updated["ema"] = torch.where(known, decay * prior + (1 - decay) * seen, upsilon_b)
            return delta_b.clamp(0.0, cap * threat.delta)

    adv = attack_batch(bare, x, y, threat, loss_fn=_attack_loss_fn(bare, x, config, compute),
                       steps=config.attack_steps, step_ratio=config.attack_step_ratio, compute=compute,
                       budget=budget, start_noise=_start_noise(config), generator=generator, start=start,
                       allocate=config.attack_overshoot if config.attack_schedule == "allocate" else None)
    if upsilon_ema is not None:
        upsilon_ema = updated["ema"]

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


def is_eligible(row: dict[str, Any], before: dict[str, Any], rule: SelectionRule) -> bool:
    """Within the allowed drop of validation clean accuracy from the input's (epoch 0 always is)."""
    if rule.max_clean_drop is None:
        return True
    return row["clean_accuracy"] >= before["clean_accuracy"] - rule.max_clean_drop - 1e-12


def is_better(row: dict[str, Any], best: dict[str, Any], before: dict[str, Any], rule: SelectionRule) -> bool:
    """Strictly better than the best so far on the rule's metric, and eligible: a tie keeps the
    earlier epoch, so an epoch that only matches the input does not replace it."""
    return is_eligible(row, before, rule) and row[str(rule.metric)] > best[str(rule.metric)]


def validation_split(train_y: torch.Tensor, config: FinetuneConfig) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Indices (fit, validation) into the training images, stratified by class and seeded by
    config.seed, with a record of the split (sizes, seed, a digest of the validation indices)."""
    labels = train_y.cpu().numpy()
    n_val = validation_split_size(len(labels), config)
    if n_val == 0:
        raise ValueError("fine-tuning needs at least 2 training images (one to train on, one to validate)")
    fit_idx, val_idx = stratified_split(labels, test_fraction=n_val / len(labels), seed=config.seed)
    fit_idx, val_idx = np.sort(fit_idx), np.sort(val_idx)
    record = {"method": "stratified by class", "seed": config.seed, "fraction": config.validation_fraction,
              "validation_examples": int(len(val_idx)), "train_examples": int(len(fit_idx)),
              "validation_indices_sha256": hashlib.sha256(val_idx.astype(np.int64).tobytes()).hexdigest()}
    return fit_idx, val_idx, record


def finetune(config: FinetuneConfig, model: torch.nn.Module, data: ImageData, hooks: Hooks | None = None,
             *, device: str | torch.device | None = None, resume: TrainingCheckpoint | None = None,
             context: dict[str, Any] | None = None, world: World = SINGLE) -> FinetuneResult:
    """Fine-tune `model` on `data`; `context` (job, model and data set ids, the model's sha256)
    goes into the result's provenance as given. `world`: run as one rank of several
    (core.engine.distributed); every rank calls this with the same arguments, trains on its shard of
    each global batch and evaluates its shard of the validation and test images."""
    hooks = hooks or Hooks()
    started_at = utc_timestamp()
    threat = Threat.from_spec(config.threat_model).across(world)

    # --- data: the training images in use, split into fit and validation; the test slice -----
    n_available = data.train_x.shape[0] if config.train_examples is None else min(config.train_examples,
                                                                                   data.train_x.shape[0])
    config = resolve_finetune(config, n_available)     # a job's config was resolved at submit
    compute = Compute.resolve(device, config.amp, config.channels_last,            # the training step
                              attack_step=_finest_step(config, threat))
    eval_compute = Compute.resolve(compute.device, config.eval_amp, config.channels_last)  # measurements
    model = compute.prepare_model(model)
    generator = torch.Generator(device=compute.device).manual_seed(config.seed)

    fit_idx, val_idx, split_record = validation_split(data.train_y[:n_available], config)
    train_x = data.train_x[torch.from_numpy(fit_idx)].to(compute.device)   # uint8 on the device
    train_y = data.train_y[torch.from_numpy(fit_idx)].to(compute.device)
    # each rank measures its shard of the validation and test images (whole-set quantities are global)
    val_x = eval_compute.images(to_unit_float(world.shard(data.train_x[torch.from_numpy(val_idx)]), compute.device))
    val_y = world.shard(data.train_y[torch.from_numpy(val_idx)]).to(compute.device)
    n_test = data.test_x.shape[0] if config.test_examples is None else min(config.test_examples, data.test_x.shape[0])
    test_x = eval_compute.images(to_unit_float(world.shard(data.test_x[:n_test]), compute.device))
    test_y = world.shard(data.test_y[:n_test]).to(compute.device)
    n_train = train_x.shape[0]
    augment = config.augment == "crop_flip" or (config.augment == "auto" and is_cifar_like(data.image_shape))
    batch_size = min(int(config.batch_size), n_train)
    epochs = int(config.epochs)
    steps_per_epoch = max(1, n_train // batch_size)       # drop the last partial batch (BN needs > 1)
    if batch_size % world.size:
        raise ValidationError(f"batch_size {batch_size} does not split evenly over {world.size} devices; "
                              "use a multiple of the device count.")
    total_steps = steps_per_epoch * epochs
    rule = config.selection

    # --- optimiser, schedule, and the state a resume restores ------------------------------
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config.lr), momentum=config.momentum,
                                nesterov=config.nesterov and config.momentum > 0,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    perturbation = RandomWeightPerturbation(model, config.weight_perturbation)
    dynamic_budget = config.budget == "dynamic" and threat.distributional
    # evaluation batches change no number, only speed: sized for this device, not the training batch
    eval_batch = world.eval_batch(AdaptiveBatch(auto_eval_batch_size(eval_compute.device.type, tuple(val_x.shape[1:])),
                                                report_halving(hooks.event)))
    # fast W-TRADES: every fit image's perturbation, carried across epochs (empty again after a resume)
    memory = (PerturbationMemory(n_train, tuple(train_x.shape[1:]), compute.device)
              if config.attack_schedule == "memory" else None)

    if resume is None:
        warnings: list[str] = []
        few = few_steps_warning(n_train, batch_size)
        if few:
            warnings.append(few)
            hooks.warn(few, {"steps_per_epoch": steps_per_epoch, "batch_size": batch_size, "train_examples": n_train})
        hooks.progress(0.0, "evaluate", {"epoch": 0, "total_epochs": epochs})
        before = evaluate_heldout(model, val_x, val_y, threat, config, eval_compute, seed=config.seed,
                                  batch=eval_batch, should_stop=hooks.should_stop)
        if not hooks.should_stop():   # epoch 0's validation metrics, live: the input model is a candidate
            hooks.progress(0.0, "evaluate", {"epoch": 0, "total_epochs": epochs, **before})
        before_test = None if hooks.should_stop() else evaluate_heldout(
            model, test_x, test_y, threat, config, eval_compute, seed=config.seed, test=True, batch=eval_batch,
            should_stop=hooks.should_stop)
        if before_test is None or hooks.should_stop():  # stopped before any training: nothing to keep
            state = _state_copy(model)
            return FinetuneResult(best_epoch=0, epochs_completed=0, stopped=True, before=before, after=None,
                                  validation={"before": before, "best": before, "last": before}, history=[],
                                  best_model_state=state, last_model_state=state,
                                  config=config.model_dump(mode="json"), warnings=warnings)
        history: list[dict[str, Any]] = []
        best_epoch, best_metrics, best_state = 0, before, _state_copy(model)
        start_epoch = 0
        hooks.progress(0.0, "train", {"epoch": 0, "total_epochs": epochs})   # Ῡ is part of training
        upsilon_ema = (estimate_global_sensitivity(model, train_x, train_y, threat, config, compute, generator,
                                                   augment)
                       if dynamic_budget else torch.zeros((), device=compute.device, dtype=torch.float64))
    else:
        model.load_state_dict(resume.model_state)
        optimizer.load_state_dict(resume.optimizer_state)
        scheduler.load_state_dict(resume.scheduler_state)
        generator.set_state(resume.rng_state["generator"])
        extra = resume.extra
        before, before_test, history = extra["before"], extra["before_test"], list(extra["history"])
        best_epoch, best_metrics = extra["best_epoch"], extra["best_metrics"]
        best_state = resume.best_model_state
        start_epoch = resume.epoch
        upsilon_ema = torch.tensor(extra["upsilon_ema"], device=compute.device, dtype=torch.float64)
        warnings, started_at = list(extra["warnings"]), extra["started_at"]
    partial = resume.extra.get("partial") if resume is not None else None   # stopped inside an epoch

    def recipe_state() -> dict[str, Any]:
        return {"before": before, "before_test": before_test, "history": history, "best_epoch": best_epoch,
                "best_metrics": best_metrics, "upsilon_ema": float(upsilon_ema), "warnings": warnings,
                "started_at": started_at}

    last_metrics = history[-1] if history else before
    trainer = world.wrap(model)   # DDP across ranks; the model itself in one process
    stopped = False
    epoch = start_epoch
    for epoch in range(start_epoch + 1, epochs + 1):
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
            crop = crop_flip_draw(x.shape[0], generator=generator, device=x.device) if augment else None
            if crop is not None:
                x = augment_crop_flip(x, draw=crop)
            x, y = world.shard(compute.images(x)), world.shard(y)   # augmented as one batch, then split
            start = None if memory is None else world.shard(memory.recall(idx, crop))

            loss, adv, new_ema = w_trades_step(
                trainer, optimizer, x, y, threat=threat, config=config, compute=compute,
                perturbation=perturbation, generator=generator,
                upsilon_ema=upsilon_ema if dynamic_budget else None, start=start)
            if memory is not None:
                memory.store(idx, world.gather((adv.x_adv - x).float()), crop)
            if new_ema is not None:
                upsilon_ema = new_ema
            budget_sum += adv.delta
            scheduler.step()
            loss_sum += loss.double()
            steps_done = step + 1

            if step % 5 == 4 or step == steps_per_epoch - 1:
                done = (epoch - 1 + steps_done / steps_per_epoch) / epochs
                hooks.progress(done, "train", {"epoch": epoch, "total_epochs": epochs,
                                               "step": steps_done, "total_steps": steps_per_epoch})
                if hooks.should_stop():
                    stopped = True
                    break

        train_loss = float(loss_sum / max(steps_done, 1))
        if not stopped:
            hooks.progress((epoch - 0.05) / epochs, "evaluate", {"epoch": epoch, "total_epochs": epochs})
            metrics = evaluate_heldout(model, val_x, val_y, threat, config, eval_compute, seed=config.seed + epoch,
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
                extra={**recipe_state(),
                       "partial": {"epoch": epoch, "steps_done": steps_done, "loss_sum": float(loss_sum),
                                   "budget_sum": float(budget_sum)}},
                total_epochs=epochs, final=True))
            epoch -= 1
            break

        mean_delta = float(budget_sum / max(steps_done, 1))
        row = {"epoch": epoch, "train_loss": train_loss, **metrics, "mean_batch_delta": mean_delta,
               "mean_batch_delta_ratio": mean_delta / threat.delta if threat.delta else 1.0,
               "upsilon_ema": float(upsilon_ema), "lr": scheduler.get_last_lr()[0],
               "seconds": time.perf_counter() - t0}
        history.append(row)
        last_metrics = row
        is_best = is_better(row, best_metrics, before, rule)
        if is_best:
            best_epoch, best_metrics, best_state = epoch, row, _state_copy(model)
        hooks.checkpoint(TrainingCheckpoint(
            epoch=epoch, model_state=_state_copy(model), best_model_state=best_state,
            optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
            rng_state={"generator": generator.get_state()}, metrics=row, is_best=is_best,
            extra=recipe_state(), total_epochs=epochs, final=epoch == epochs))
        hooks.progress(epoch / epochs, "train", {"epoch": epoch, "total_epochs": epochs,
                                                 **{k: row[k] for k in row if k != "epoch"}})

    # --- the reported numbers: the input and the chosen checkpoint on the test set ----------
    last_state = _state_copy(model)
    after: dict[str, Any] | None
    if best_epoch == 0:
        after = before_test                      # the same weights: the same numbers
    elif stopped:
        after = None                             # a cancelled run is not evaluated further
    else:
        hooks.progress(1.0, "test", {"epoch": epoch, "total_epochs": epochs})
        model.load_state_dict(best_state)
        after = evaluate_heldout(model, test_x, test_y, threat, config, eval_compute, seed=config.seed, test=True,
                                 batch=eval_batch)
    if best_epoch == 0 and not stopped:
        message = (f"no fine-tuned epoch beat the input model on validation {rule.metric} at δ={threat.delta:g} "
                   f"({'no limit on the clean accuracy' if rule.max_clean_drop is None else f'clean accuracy allowed to drop by at most {rule.max_clean_drop}'}); the best checkpoint is the "
                   "input model, unchanged.")
        warnings.append(message)
        hooks.warn(message, {"improved": False, "best_epoch": 0})
    for name, metrics_ in (("before", before_test), ("after", after)):
        if metrics_ is not None and not metrics_["w2_converged"]:
            message = (f"W-PGD had not converged on the test set ({name}): the accuracy still fell in the last "
                       f"quarter of its {config.test_wpgd_steps} steps, so the W2 robust accuracy is an upper "
                       "bound; raise test_wpgd_steps for a tighter number.")
            warnings.append(message)
            hooks.warn(message, {"which": name, "test_wpgd_steps": config.test_wpgd_steps})

    selection = {"metric": rule.metric, "max_clean_drop": rule.max_clean_drop, "split": "validation",
                 "candidates": f"epochs 0-{epoch} (0 = the input model)", "best_epoch": best_epoch,
                 "best_validation_value": best_metrics[str(rule.metric)]}
    provenance = {
        **(context or {}), "seed": config.seed,
        "examples": {"train": n_train, "validation": int(len(val_idx)), "test": n_test,
                     "train_available": n_available},
        "validation_split": split_record,
        **runtime_provenance(compute.device),
        "training_precision": "bf16" if compute.amp_dtype is not None else "float32",
        "evaluation_precision": "bf16" if eval_compute.amp_dtype is not None else "float32",
        "float32_stem": compute.float32_stem, "evaluation_batch_size": eval_batch.size,
        "started_at": started_at, "finished_at": utc_timestamp(),
    }
    if memory is not None:
        provenance["perturbation_memory"] = {
            "bytes": memory.nbytes, "images": n_train, "images_remembered": memory.remembered(),
            "started_empty_on_resume": resume is not None}
    return FinetuneResult(
        best_epoch=best_epoch, epochs_completed=epoch, stopped=stopped, before=before_test, after=after,
        validation={"before": before, "best": best_metrics, "last": last_metrics}, history=history,
        best_model_state=best_state, last_model_state=last_state, config=config.model_dump(mode="json"),
        selection=selection, warnings=warnings, provenance=provenance,
    )
