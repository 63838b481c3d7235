"""W-TRADES fine-tuning, one readable recipe from top to bottom, in six named stages:

    setup       resolve the config; draw every subset as a seeded stratified sample (train_examples,
                the validation split, test_examples; core.engine.data.sampling); build the optimiser
    start       validate the input model (epoch 0, a candidate like any epoch) and estimate Ῡ
      or restore  the state a checkpoint saved (an epoch stopped inside is replayed from its shuffle)
    train_epoch for each batch: attack (W-PGD-Budget) → CE + β·KL at randomly perturbed weights →
                SGD step; then the per-epoch validation (cheap W-PGD and PGD)
    select      keep the epoch if it beats the best so far on validation; checkpoint it
    final_evaluation  the input model and the chosen checkpoint on the test split: the evaluation
                ensemble, intervals, per-class numbers, the masking audit and the verdict
                (core.engine.recipes.before_after, core.engine.recipes.verdict)
    provenance  where every number comes from

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.engine.attacks.common import PerSampleLoss
from core.engine.attacks.pgd import pgd
from core.engine.attacks.wpgd import BatchAttack, attack_batch, w_pgd
from core.engine.cache import MeasurementCache, ReadOnly
from core.engine.checkpoint import TrainingCheckpoint
from core.engine.config import FinetuneConfig, SelectionRule
from core.engine.data.datasets import (
    CropFlip,
    ImageData,
    augment_crop_flip,
    crop_flip_draw,
    is_cifar_like,
    to_unit_float,
)
from core.engine.data.sampling import class_counts, sample_record, stratified_indices
from core.engine.defaults import auto_eval_batch_size, few_steps_warning, resolve_finetune, validation_split_size
from core.engine.device import Compute, batches
from core.engine.distributed import SINGLE, World, unwrap
from core.engine.evaluation.audit import audit_status
from core.engine.evaluation.ensemble import PRESETS
from core.engine.evaluation.invariants import check_report
from core.engine.hooks import Hooks
from core.engine.losses import attack_loss, kl_divergence
from core.engine.oom import AdaptiveBatch, report_halving
from core.engine.plots import CorruptionBars, training_curve_png
from core.engine.provenance import runtime_provenance, utc_timestamp
from core.engine.recipes import verdict as verdicts
from core.engine.recipes.before_after import BeforeAfter, HeldOutSet, compare, measurement_passes
from core.engine.threats import Threat
from core.errors import ValidationError


@dataclass
class FinetuneResult:
    best_epoch: int                     # 0: no fine-tuned epoch beat the input model
    epochs_completed: int
    stopped: bool                       # should_stop() ended the run early
    before: dict[str, Any] | None       # test-set metrics of the model that went in (None: stopped early)
    after: dict[str, Any] | None        # test-set metrics of the best checkpoint (None: stopped early)
    validation: dict[str, Any]          # validation metrics: before, best, last
    history: list[dict[str, Any]]
    best_model_state: dict[str, torch.Tensor] = field(repr=False)
    last_model_state: dict[str, torch.Tensor] = field(repr=False)
    config: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    verdict: verdicts.Verdict | None = None             # core.engine.recipes.verdict
    change_ci95: dict[str, list[float]] = field(default_factory=dict)   # paired 95 % interval of each change
    audit: list[dict[str, str]] = field(default_factory=list)           # the masking audit of the checkpoint

    @property
    def improved(self) -> bool:
        """The verdict is an unqualified "improved": the paired interval of the selection metric's
        change on the test split lies above zero and no guard fired."""
        return self.verdict is not None and self.verdict.improved

    @property
    def summary(self) -> dict[str, Any]:
        """Everything but the per-epoch history: the job's `result` (same field names as the report)."""
        change = None
        if self.after is not None and self.before is not None:
            change = {k: self.after[k] - self.before[k] for k in _ACCURACY_KEYS
                      if isinstance(self.after.get(k), (int, float)) and isinstance(self.before.get(k), (int, float))}
        labels = self.validation["before"]     # the threat the run measured (the test split may be unmeasured)
        return {
            "type": "finetune", "improved": self.improved,
            **(self.verdict.to_dict() if self.verdict is not None else {}),
            "best_epoch": self.best_epoch, "epochs_completed": self.epochs_completed, "stopped": self.stopped,
            "threat_model": {"kind": labels["threat_model"], "delta": labels["delta"]},
            "evaluation": self.config.get("evaluation"),
            "before": self.before, "after": self.after, "change": change, "change_ci95": self.change_ci95 or None,
            "audit": self.audit, "audit_status": audit_status(self.audit) if self.audit else None,
            "selection": self.selection, "validation": self.validation, "warnings": self.warnings,
            "config": self.config, "provenance": self.provenance,
        }

    @property
    def report(self) -> dict[str, Any]:
        return check_report({**self.summary, "history": self.history})

    def plot_png(self) -> bytes:
        rows = [{"epoch": 0, **self.validation["before"]}] + [h for h in self.history if "clean_accuracy" in h]
        keys = [k for k in ("clean_accuracy", "w2_robust_accuracy", "linf_robust_accuracy",
                            "l2_robust_accuracy") if k in rows[0]]
        # with corruptions (config.corruptions): beside it, the test accuracy per type before and after
        bars = CorruptionBars.of({"input model": (self.before or {}).get("corruptions"),
                                  f"epoch {self.best_epoch}": (self.after or {}).get("corruptions")}
                                 if self.best_epoch > 0 else {"input model": (self.before or {}).get("corruptions")})
        return training_curve_png([r["epoch"] for r in rows], {k: [r[k] for r in rows] for k in keys},
                                  "W-TRADES fine-tuning: validation accuracy (epoch 0 = the input)", corruptions=bars)


_ACCURACY_KEYS = ("clean_accuracy", "w2_robust_accuracy", "linf_robust_accuracy", "l2_robust_accuracy",
                  "w2_robust_to_clean_ratio", "linf_robust_to_clean_ratio", "l2_robust_to_clean_ratio")


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def evaluate_heldout(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat,
                     config: FinetuneConfig, compute: Compute, *, test: bool = False,
                     batch: AdaptiveBatch | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Clean, W2 and pointwise (PGD) accuracy on held-out images, labelled with the radius and
    threat models they measure and whether W-PGD converged. The W2 accuracy is the smaller of
    W-PGD-ReDLR's and PGD's (`w2_wpgd_robust_accuracy` is W-PGD's alone): PGD's points lie within
    δ of their images in the ground norm, so the set is inside the W2 ball and its accuracy is an
    upper bound of the W2 robust accuracy too, which keeps W2 ≤ pointwise in every row. PGD starts
    at the clean images (no random start), so its numbers, and the minimum, are the same on one
    device and split over several. The validation
    split gets eval_*_steps every epoch; the reported test numbers (`test`) the stronger
    test_*_steps. The batch halves on a CUDA out-of-memory error; `should_stop` cuts both
    attacks short (the numbers are then not to be kept). `progress(share done)` follows the two
    attacks step by step, each by its steps."""
    model.eval()
    batch = batch or AdaptiveBatch(auto_eval_batch_size(compute.device.type, tuple(x.shape[1:])))
    w2 = threat.w2
    wpgd_steps = config.test_wpgd_steps if test else config.eval_wpgd_steps
    pgd_steps = config.test_pgd_steps if test else config.eval_pgd_steps
    report = progress or (lambda share: None)
    wpgd_share = (wpgd_steps + 1) / (wpgd_steps + pgd_steps + 2)   # + 1: each attack's clean forward pass
    wres = batch.run("held-out w-pgd", lambda size: w_pgd(
        model, x, y, w2, steps=wpgd_steps, loss="redlr", batch_size=size, compute=compute, should_stop=should_stop,
        progress=lambda t, total: report(wpgd_share * t / total)))
    pres = batch.run("held-out pgd", lambda size: pgd(
        model, x, y, threat.pointwise, steps=pgd_steps, loss="ce", batch_size=size, compute=compute,
        random_start=False, should_stop=should_stop,
        progress=lambda done, total: report(wpgd_share + (1 - wpgd_share) * done / total)))
    clean = wres.clean_accuracy
    w2_accuracy = min(wres.robust_accuracy, pres.robust_accuracy)
    return {
        **threat.labels(), "n_examples": int(x.shape[0]),
        "clean_accuracy": clean,
        "w2_robust_accuracy": w2_accuracy,
        "w2_wpgd_robust_accuracy": wres.robust_accuracy,
        f"{threat.ground}_robust_accuracy": pres.robust_accuracy,
        "w2_robust_to_clean_ratio": w2_accuracy / clean if clean > 0 else 0.0,
        f"{threat.ground}_robust_to_clean_ratio": pres.robust_accuracy / clean if clean > 0 else 0.0,
        "sensitivity": wres.sensitivity,
        "w2_converged": wres.converged,
    }


def estimate_global_sensitivity(model: torch.nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
                                threat: Threat, config: FinetuneConfig, compute: Compute,
                                generator: torch.Generator, augment: bool) -> torch.Tensor:
    """The starting Ῡ: the mean batch sensitivity Υ_B over batches of the training batch size
    drawn from a seeded stratified sample of `budget_subset` training images (uint8, on the device;
    core.engine.data.sampling), augmented as the training batches are. The running estimate
    averages the same quantity, Υ_B, so that the batch radii δ_B = δ·Υ_B/Ῡ average δ."""
    model.eval()
    idx = torch.from_numpy(stratified_indices(train_y.cpu().numpy(), config.budget_subset, config.seed))
    x_all, y_all = train_x[idx.to(train_x.device)], train_y[idx.to(train_y.device)]
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
    and, when evaluation runs in bf16 too, the held-out W-PGD's 1.875·δ/steps at δ/2 (the
    masking audit's smallest radius)."""
    steps = [config.attack_step_ratio * threat.delta / config.attack_steps]
    if config.eval_amp == "bf16":
        steps.append(1.875 * threat.delta / 2 / max(config.eval_wpgd_steps, config.test_wpgd_steps))
    return min(steps)


def _start_noise(config: FinetuneConfig) -> float:
    return 0.001 if config.attack_loss == "kl" else 0.0


def _attack_loss_fn(model: torch.nn.Module, x: torch.Tensor, config: FinetuneConfig, compute: Compute
                    ) -> PerSampleLoss:
    if config.attack_loss != "kl":
        return attack_loss(config.attack_loss)
    with torch.no_grad(), compute.autocast():   # the clean softmax, once per batch
        return attack_loss("kl", logits_clean=model(compute.images(x)).float())


class RandomWeightPerturbation:
    """W ← W + γ·‖W‖_F·ξ/‖ξ‖_F on every weight with more than one dimension; `restore` undoes it."""

    def __init__(self, model: torch.nn.Module, gamma: float) -> None:
        self.gamma = gamma
        self.params: list[torch.Tensor] = [p for p in model.parameters() if p.dim() > 1 and p.requires_grad]
        self.saved: list[torch.Tensor] = []

    @torch.no_grad()
    def apply(self, generator: torch.Generator) -> None:
        if self.gamma <= 0 or not self.params:
            return
        self.saved = [p.detach().clone() for p in self.params]
        noise = [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for p in self.params]
        w_norms = torch._foreach_norm(self.params)
        n_norms = torch._foreach_norm(noise)
        scales = [self.gamma * w / n.clamp_min(1e-12) for w, n in zip(w_norms, n_norms, strict=True)]
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
    return bool(row["clean_accuracy"] >= before["clean_accuracy"] - rule.max_clean_drop - 1e-12)


def is_better(row: dict[str, Any], best: dict[str, Any], before: dict[str, Any], rule: SelectionRule) -> bool:
    """Strictly better than the best so far on the rule's metric, and eligible: a tie keeps the
    earlier epoch, so an epoch that only matches the input does not replace it."""
    return is_eligible(row, before, rule) and bool(row[str(rule.metric)] > best[str(rule.metric)])


def validation_split(train_y: torch.Tensor, config: FinetuneConfig, num_classes: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Indices (fit, validation) into the training images: the validation images are a seeded
    stratified sample (core.engine.data.sampling) of `validation_split_size` images, the fit images
    the rest; with a record of the split (sizes, seed, images per class, a digest of the validation
    indices)."""
    labels = train_y.cpu().numpy()
    n_val = validation_split_size(len(labels), config)
    if n_val == 0:
        raise ValidationError("fine-tuning needs at least 2 training images (one to train on, one to validate)")
    val_idx = np.sort(stratified_indices(labels, n_val, config.seed))
    fit_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    record = {"method": "stratified random sample", "seed": config.seed, "fraction": config.validation_fraction,
              "validation_examples": len(val_idx), "train_examples": len(fit_idx),
              "per_class": {"train": class_counts(labels[fit_idx], num_classes),
                            "validation": class_counts(labels[val_idx], num_classes)},
              "validation_indices_sha256": hashlib.sha256(val_idx.astype(np.int64).tobytes()).hexdigest()}
    return fit_idx, val_idx, record


# --- stage 1: setup ----------------------------------------------------------------------------

@dataclass
class Subsets:
    """The images a run uses, as indices into the data set's splits: every one a seeded stratified
    sample (core.engine.data.sampling), never the first N."""

    train: np.ndarray          # train_examples of the training split (all: every index)
    fit: np.ndarray            # ... less the validation images: what the model trains on
    validation: np.ndarray
    test: np.ndarray           # test_examples of the test split
    split_record: dict[str, Any]
    records: dict[str, Any]    # sample_record of each, for the provenance


def draw_subsets(config: FinetuneConfig, data: ImageData) -> Subsets:
    train_labels, test_labels = data.train_y.numpy(), data.test_y.numpy()
    train = stratified_indices(train_labels, config.train_examples, config.seed)
    fit, validation, split_record = validation_split(data.train_y[torch.from_numpy(train)], config, data.num_classes)
    fit, validation = train[fit], train[validation]          # into the whole training split
    test = stratified_indices(test_labels, config.test_examples, config.seed)
    records = {name: sample_record(labels, idx, config.seed, data.num_classes) for name, labels, idx in (
        ("train", train_labels, train), ("fit", train_labels, fit), ("validation", train_labels, validation),
        ("test", test_labels, test))}
    return Subsets(train, fit, validation, test, split_record, records)


@dataclass
class Run:
    """What setup fixes for the whole run: the resolved config, the devices, the images of each
    split on the device, the schedule and the optimiser. Nothing here changes between epochs but
    the model's, optimiser's and scheduler's own state."""

    config: FinetuneConfig
    threat: Threat                       # across the world (whole-set quantities are global)
    world: World
    compute: Compute                     # the training step
    eval_compute: Compute                # measurements: float32 unless eval_amp
    model: torch.nn.Module
    trainer: torch.nn.Module             # DDP around the model across ranks; the model itself in one process
    input_state: dict[str, torch.Tensor]  # the weights that went in: the test's "before"
    generator: torch.Generator
    train_x: torch.Tensor                # fit images, uint8 on the device (the whole set on every rank)
    train_y: torch.Tensor
    val_x: torch.Tensor                  # this rank's shard of the validation images, unit floats
    val_y: torch.Tensor
    test_x: torch.Tensor                 # the whole test sample, uint8 on the CPU (measured once, at the end)
    test_y: torch.Tensor
    samples: dict[str, Any]              # provenance of every subset (core.engine.data.sampling.sample_record)
    split_record: dict[str, Any]
    n_available: int
    num_classes: int
    class_names: list[str] | None
    augment: bool
    batch_size: int
    epochs: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    perturbation: RandomWeightPerturbation
    dynamic_budget: bool
    eval_batch: AdaptiveBatch
    memory: PerturbationMemory | None
    started_at: str

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    def epoch_info(self, epoch: int, **more: Any) -> dict[str, Any]:
        return {"epoch": epoch, "total_epochs": self.epochs, **more}

    # The job's progress is shared out by a count of forward/backward passes per image, so that the
    # share done (and the ETA estimated from it) moves with the work: the input model's validation
    # (epoch 0), each epoch's training (the inner attack's K + 2 per fit image) and validation, and
    # the final evaluation (core.engine.recipes.before_after.measurement_passes). Only the progress
    # and its ETA depend on it.
    @property
    def validation_passes(self) -> float:
        n_val = int(self.val_y.shape[0]) * self.world.size
        return float(n_val * (self.config.eval_wpgd_steps + self.config.eval_pgd_steps + 2))

    @property
    def training_passes(self) -> float:
        """One epoch's training."""
        return float(self.n_train * (self.config.attack_steps + 2))

    @property
    def final_share(self) -> float:
        """The share of the job's progress given to the final evaluation (between 2 % and 80 %):
        without it the bar sat at 100 % with no ETA through the longest measurement."""
        final = int(self.test_y.shape[0]) * measurement_passes(self.config, self.eval_compute.device.type)
        before = self.validation_passes + self.epochs * (self.training_passes + self.validation_passes)
        return min(max(final / (final + before), 0.02), 0.8)

    def training_progress(self, fraction: float) -> float:
        """The job's progress at `fraction` of everything before the final evaluation."""
        return fraction * (1.0 - self.final_share)

    def progress_at(self, epoch: int, part: str, done: float) -> float:
        """The job's progress `done` of the way through `part` ("train" or "evaluate") of `epoch`
        (epoch 0: the input model's validation, then the Ῡ estimate at the start of training)."""
        val, train = self.validation_passes, self.training_passes
        at = 0.0 if epoch == 0 else val + (epoch - 1) * (train + val)
        if epoch == 0:
            at += val * done if part == "evaluate" else val
        else:
            at += train * done if part == "train" else train + val * done
        return self.training_progress(at / (val + self.epochs * (train + val)))


def setup(config: FinetuneConfig, model: torch.nn.Module, data: ImageData, hooks: Hooks, *,
          device: str | torch.device | None, world: World) -> Run:
    """Resolve the config, sample the subsets, move the images to the device, build the optimiser."""
    started_at = utc_timestamp()
    threat = Threat.from_spec(config.threat_model).across(world)
    subsets = draw_subsets(config, data)
    config = resolve_finetune(config, len(subsets.train))     # a job's config was resolved at submit
    compute = Compute.resolve(device, config.amp, config.channels_last, attack_step=_finest_step(config, threat))
    eval_compute = Compute.resolve(compute.device, config.eval_amp, config.channels_last)
    input_state = _state_copy(model)
    model = compute.prepare_model(model)

    fit, val = torch.from_numpy(subsets.fit), torch.from_numpy(subsets.validation)
    train_x, train_y = data.train_x[fit].to(compute.device), data.train_y[fit].to(compute.device)  # uint8
    # each rank measures its shard of the validation images (whole-set quantities are global)
    val_x = eval_compute.images(to_unit_float(world.shard(data.train_x[val]), compute.device))
    val_y = world.shard(data.train_y[val]).to(compute.device)

    batch_size = min(int(config.batch_size), train_x.shape[0])
    if batch_size % world.size:
        raise ValidationError(f"batch_size {batch_size} does not split evenly over {world.size} devices; "
                              "use a multiple of the device count.")
    steps_per_epoch = max(1, train_x.shape[0] // batch_size)     # drop the last partial batch (BN needs > 1)
    epochs = int(config.epochs)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config.lr), momentum=config.momentum,
                                nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
    # evaluation batches change no number, only speed: sized for this device, not the training batch
    eval_batch = world.eval_batch(AdaptiveBatch(auto_eval_batch_size(eval_compute.device.type, tuple(val_x.shape[1:])),
                                                report_halving(hooks.event)))
    # fast W-TRADES: every fit image's perturbation, carried across epochs (empty again after a resume)
    memory = (PerturbationMemory(train_x.shape[0], tuple(train_x.shape[1:]), compute.device)
              if config.attack_schedule == "memory" else None)
    return Run(
        config=config, threat=threat, world=world, compute=compute, eval_compute=eval_compute, model=model,
        trainer=world.wrap(model), input_state=input_state,
        generator=torch.Generator(device=compute.device).manual_seed(config.seed),
        train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y,
        test_x=data.test_x[torch.from_numpy(subsets.test)], test_y=data.test_y[torch.from_numpy(subsets.test)],
        samples=subsets.records, split_record=subsets.split_record, n_available=len(subsets.train),
        num_classes=data.num_classes, class_names=data.class_names,
        augment=config.augment == "crop_flip" or (config.augment == "auto" and is_cifar_like(data.image_shape)),
        batch_size=batch_size, epochs=epochs, steps_per_epoch=steps_per_epoch, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps_per_epoch * epochs),
        perturbation=RandomWeightPerturbation(model, config.weight_perturbation),
        dynamic_budget=config.budget == "dynamic" and threat.distributional,
        eval_batch=eval_batch, memory=memory, started_at=started_at)


def validate(run: Run, hooks: Hooks, epoch: int) -> dict[str, Any]:
    """The validation of `epoch` (0: the input model; cheap attacks, eval_* steps), its progress
    reported step by step as phase "evaluate"; `hooks.should_stop` cuts it short."""
    info = run.epoch_info(epoch)
    hooks.progress(run.progress_at(epoch, "evaluate", 0.0), "evaluate", info)
    return evaluate_heldout(run.model, run.val_x, run.val_y, run.threat, run.config, run.eval_compute,
                            batch=run.eval_batch, should_stop=hooks.should_stop,
                            progress=lambda done: hooks.progress(run.progress_at(epoch, "evaluate", done),
                                                                 "evaluate", info))


# --- stage 2: the state of training, started fresh or resumed --------------------------------

@dataclass
class TrainingState:
    """What changes from epoch to epoch, and what a checkpoint's `extra` carries to resume it."""

    before: dict[str, Any]               # validation metrics of the input model (epoch 0)
    history: list[dict[str, Any]]
    best_epoch: int
    best_metrics: dict[str, Any]
    best_state: dict[str, torch.Tensor]
    upsilon_ema: torch.Tensor            # Ῡ, the running global sensitivity (0: none)
    warnings: list[str]
    started_at: str
    epoch: int = 0                       # epochs completed
    stopped: bool = False

    @property
    def last_metrics(self) -> dict[str, Any]:
        return self.history[-1] if self.history else self.before

    def extra(self) -> dict[str, Any]:
        """The JSON part of a checkpoint: everything but tensors."""
        return {"before": self.before, "history": self.history, "best_epoch": self.best_epoch,
                "best_metrics": self.best_metrics, "upsilon_ema": float(self.upsilon_ema),
                "warnings": self.warnings, "started_at": self.started_at}


def start(run: Run, hooks: Hooks) -> TrainingState:
    """A fresh run: warn about too few steps, validate the input (epoch 0, a candidate), estimate Ῡ."""
    warnings: list[str] = []
    few = few_steps_warning(run.n_train, run.batch_size)
    if few:
        warnings.append(few)
        hooks.warn(few, {"steps_per_epoch": run.steps_per_epoch, "batch_size": run.batch_size,
                         "train_examples": run.n_train})
    before = validate(run, hooks, 0)
    state = TrainingState(before=before, history=[], best_epoch=0, best_metrics=before,
                          best_state=_state_copy(run.model),
                          upsilon_ema=torch.zeros((), device=run.compute.device, dtype=torch.float64),
                          warnings=warnings, started_at=run.started_at)
    if hooks.should_stop():          # stopped before any training: nothing to keep
        state.stopped = True
        return state
    done = run.progress_at(0, "evaluate", 1.0)
    hooks.progress(done, "evaluate", run.epoch_info(0, **before))   # epoch 0's metrics, live
    hooks.progress(done, "train", run.epoch_info(0))                 # Ῡ is part of training
    if run.dynamic_budget:
        state.upsilon_ema = estimate_global_sensitivity(run.model, run.train_x, run.train_y, run.threat, run.config,
                                                        run.compute, run.generator, run.augment)
    return state


def restore(run: Run, resume: TrainingCheckpoint) -> TrainingState:
    """The state a checkpoint saved: weights, optimiser, schedule, RNG and the recipe's counters."""
    run.model.load_state_dict(resume.model_state)
    run.optimizer.load_state_dict(resume.optimizer_state)
    run.scheduler.load_state_dict(resume.scheduler_state)
    run.generator.set_state(resume.rng_state["generator"])
    extra = resume.extra
    return TrainingState(
        before=extra["before"], history=list(extra["history"]), best_epoch=extra["best_epoch"],
        best_metrics=extra["best_metrics"], best_state=resume.best_model_state,
        upsilon_ema=torch.tensor(extra["upsilon_ema"], device=run.compute.device, dtype=torch.float64),
        warnings=list(extra["warnings"]), started_at=extra["started_at"], epoch=resume.epoch)


@dataclass
class PartialEpoch:
    """An epoch a cancel stopped inside: its shuffle's RNG state and the sums of the steps done."""

    epoch_start: torch.Tensor            # the generator's state when the epoch drew its shuffle
    generator: torch.Tensor              # ... and when the run stopped
    steps_done: int
    loss_sum: float
    budget_sum: float

    @classmethod
    def of(cls, resume: TrainingCheckpoint | None) -> PartialEpoch | None:
        part = resume.extra.get("partial") if resume is not None else None
        if resume is None or part is None:
            return None
        return cls(resume.rng_state["epoch_start"], resume.rng_state["generator"], part["steps_done"],
                   part["loss_sum"], part["budget_sum"])


# --- stage 3: one epoch --------------------------------------------------------------------------

@dataclass
class EpochSums:
    """Running sums over an epoch's steps (device scalars: one host synchronisation per epoch)."""

    loss: torch.Tensor
    budget: torch.Tensor
    steps_done: int = 0

    def mean(self, which: torch.Tensor) -> float:
        return float(which / max(self.steps_done, 1))


def train_epoch(run: Run, state: TrainingState, epoch: int, hooks: Hooks,
                partial: PartialEpoch | None) -> dict[str, Any] | None:
    """Train one epoch and validate it: the epoch's history row, or None when a cancel stopped it
    (the checkpoint to finish it exactly as an uninterrupted run would is then saved)."""
    t0 = time.perf_counter()
    zero = torch.zeros((), device=run.compute.device, dtype=torch.float64)
    sums = EpochSums(loss=zero.clone(), budget=zero.clone())
    epoch_rng = run.generator.get_state() if partial is None else partial.epoch_start
    if partial is not None:      # replay this epoch's shuffle, then continue where the stopped run left off
        run.generator.set_state(partial.epoch_start)
    perm = torch.randperm(run.n_train, generator=run.generator, device=run.compute.device)
    if partial is not None:
        run.generator.set_state(partial.generator)
        sums.steps_done = partial.steps_done
        sums.loss += partial.loss_sum
        sums.budget += partial.budget_sum

    stopped = _train_steps(run, state, epoch, perm, sums, hooks)
    if not stopped:
        metrics = validate(run, hooks, epoch)
        # Stopped during the validation: its numbers are cut short, so stop as inside the epoch
        # (all its steps done); a resumed run validates this epoch again.
        stopped = hooks.should_stop()
    if stopped:
        _save_partial(run, state, epoch, epoch_rng, sums, hooks)
        state.stopped = True
        return None
    mean_delta = sums.mean(sums.budget)
    return {"epoch": epoch, "train_loss": sums.mean(sums.loss), **metrics, "mean_batch_delta": mean_delta,
            "mean_batch_delta_ratio": mean_delta / run.threat.delta if run.threat.delta else 1.0,
            "upsilon_ema": float(state.upsilon_ema), "lr": run.scheduler.get_last_lr()[0],
            "seconds": time.perf_counter() - t0}


def _train_steps(run: Run, state: TrainingState, epoch: int, perm: torch.Tensor, sums: EpochSums,
                 hooks: Hooks) -> bool:
    """The epoch's W-TRADES steps from sums.steps_done on; True when a cancel stopped them."""
    world, compute = run.world, run.compute
    for step in range(sums.steps_done, run.steps_per_epoch):
        idx = perm[step * run.batch_size:(step + 1) * run.batch_size]
        x = to_unit_float(run.train_x[idx], compute.device)
        crop = crop_flip_draw(x.shape[0], generator=run.generator, device=x.device) if run.augment else None
        if crop is not None:
            x = augment_crop_flip(x, draw=crop)
        x, y = world.shard(compute.images(x)), world.shard(run.train_y[idx])   # augmented as one batch, then split
        start_at = None if run.memory is None else world.shard(run.memory.recall(idx, crop))
        loss, adv, new_ema = w_trades_step(
            run.trainer, run.optimizer, x, y, threat=run.threat, config=run.config, compute=compute,
            perturbation=run.perturbation, generator=run.generator,
            upsilon_ema=state.upsilon_ema if run.dynamic_budget else None, start=start_at)
        if run.memory is not None:
            run.memory.store(idx, world.gather((adv.x_adv - x).float()), crop)
        if new_ema is not None:
            state.upsilon_ema = new_ema
        sums.budget += adv.delta
        run.scheduler.step()
        sums.loss += loss.double()
        sums.steps_done = step + 1
        hooks.progress(run.progress_at(epoch, "train", sums.steps_done / run.steps_per_epoch), "train",
                       run.epoch_info(epoch, step=sums.steps_done, total_steps=run.steps_per_epoch))
        if (step % 5 == 4 or step == run.steps_per_epoch - 1) and hooks.should_stop():
            return True
    return False


def _save_partial(run: Run, state: TrainingState, epoch: int, epoch_rng: torch.Tensor, sums: EpochSums,
                  hooks: Hooks) -> None:
    """The checkpoint of an epoch stopped inside: epoch − 1 completed, and how far this one got."""
    partial = {"epoch": epoch, "steps_done": sums.steps_done, "loss_sum": float(sums.loss),
               "budget_sum": float(sums.budget)}
    hooks.checkpoint(_checkpoint(run, state, epoch=epoch - 1, metrics={"train_loss": sums.mean(sums.loss)},
                                 rng={"generator": run.generator.get_state(), "epoch_start": epoch_rng},
                                 final=True, partial=partial))


def _checkpoint(run: Run, state: TrainingState, *, epoch: int, metrics: dict[str, Any],
                rng: dict[str, torch.Tensor], final: bool, is_best: bool = False,
                partial: dict[str, Any] | None = None) -> TrainingCheckpoint:
    extra = state.extra() if partial is None else {**state.extra(), "partial": partial}
    return TrainingCheckpoint(
        epoch=epoch, model_state=_state_copy(run.model), best_model_state=state.best_state,
        optimizer_state=run.optimizer.state_dict(), scheduler_state=run.scheduler.state_dict(),
        rng_state=rng, metrics=metrics, is_best=is_best, extra=extra, total_epochs=run.epochs, final=final)


# --- stage 4: select -----------------------------------------------------------------------------

def select(run: Run, state: TrainingState, row: dict[str, Any], hooks: Hooks) -> None:
    """Record the epoch, keep it as the best when it beats the best so far on validation
    (core.engine.config.SelectionRule), checkpoint it and report it."""
    epoch = int(row["epoch"])
    state.history.append(row)
    state.epoch = epoch
    is_best = is_better(row, state.best_metrics, state.before, run.config.selection)
    if is_best:
        state.best_epoch, state.best_metrics, state.best_state = epoch, row, _state_copy(run.model)
    hooks.checkpoint(_checkpoint(run, state, epoch=epoch, metrics=row, rng={"generator": run.generator.get_state()},
                                 is_best=is_best, final=epoch == run.epochs))
    hooks.progress(run.progress_at(epoch, "evaluate", 1.0), "train",
                   run.epoch_info(epoch, **{k: row[k] for k in row if k != "epoch"}))


# --- stage 5: the final evaluation on the test split -------------------------------------------

def final_evaluation(run: Run, state: TrainingState, hooks: Hooks,
                     cache: MeasurementCache | None = None) -> BeforeAfter | None:
    """The input model and the chosen checkpoint on the test split, which played no part in the
    choice (core.engine.recipes.before_after); None for a stopped run, which is not measured.
    `cache`: the input model's measurement may be read from it (core.engine.cache); across ranks
    only rank 0 writes to it."""
    if state.stopped:
        return None
    if cache is not None and not run.world.is_main:
        cache = ReadOnly(cache)
    info = run.epoch_info(state.epoch)
    test = HeldOutSet(
        x=run.eval_compute.images(to_unit_float(run.test_x, run.compute.device)), y=run.test_y.to(run.compute.device),
        threat=Threat.from_spec(run.config.threat_model), config=run.config, compute=run.eval_compute,
        batch=run.eval_batch, num_classes=run.num_classes, class_names=run.class_names,
        # across ranks a cancel is agreed by a collective, which a rank measuring alone must not call
        should_stop=None if run.world.distributed else hooks.should_stop)
    outcome = compare(run.model, run.input_state, state.best_state, state.best_epoch, test,
                      _unchanged_message(run),
                      lambda done, phase: hooks.progress(1.0 - run.final_share * (1.0 - done), f"test: {phase}", info),
                      cache=cache)
    if outcome is None:            # cancelled while measuring: every epoch's checkpoint is kept
        state.stopped = True
    return outcome


def _report_outcome(state: TrainingState, hooks: Hooks, outcome: BeforeAfter | None) -> None:
    """Tell, as events and in the result's warnings, what the numbers do not say by themselves."""
    if outcome is None:
        return
    for line in outcome.warnings:
        _warn(state, hooks, line, {"which": "test"})
    failed = [c for c in outcome.audit if c["status"] == "fail"]
    if failed:
        _warn(state, hooks, "the masking audit failed (" + "; ".join(f"{c['check']}: {c['detail']}" for c in failed)
              + "): the robust accuracies may be far too high, as for a model that hides its gradients.",
              {"audit": "fail", "checks": [c["check"] for c in failed]})
    if outcome.verdict.name not in ("improved", "unchanged"):
        _warn(state, hooks, outcome.verdict.text, {"verdict": outcome.verdict.name, "improved": False})


# --- stage 6: provenance -------------------------------------------------------------------------

def provenance(run: Run, state: TrainingState, context: dict[str, Any] | None, resumed: bool,
               reused: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where the numbers come from: the ids the caller gave, the seed, every subset as drawn, the
    software and device, the precisions and the times; with a measurement cache, what the final
    evaluation read back from it (`reused`)."""
    record = {
        **(context or {}), "seed": run.config.seed,
        "examples": {"train": run.n_train, "validation": run.split_record["validation_examples"],
                     "test": int(run.test_x.shape[0]), "train_available": run.n_available},
        "samples": run.samples, "validation_split": run.split_record,
        # what measured the before/after numbers (core.engine.evaluation.ensemble.PRESETS)
        "evaluation": {"preset": run.config.evaluation, **PRESETS[run.config.evaluation].describe()},
        **runtime_provenance(run.compute.device),
        "training_precision": "bf16" if run.compute.amp_dtype is not None else "float32",
        "evaluation_precision": "bf16" if run.eval_compute.amp_dtype is not None else "float32",
        "float32_stem": run.compute.float32_stem, "evaluation_batch_size": run.eval_batch.size,
        "started_at": state.started_at, "finished_at": utc_timestamp(),
    }
    if reused is not None:
        record["reused"] = reused
    if run.memory is not None:
        record["perturbation_memory"] = {
            "bytes": run.memory.nbytes, "images": run.n_train, "images_remembered": run.memory.remembered(),
            "started_empty_on_resume": resumed}
    return record


# --- the recipe ----------------------------------------------------------------------------------

def finetune(config: FinetuneConfig, model: torch.nn.Module, data: ImageData, hooks: Hooks | None = None,
             *, device: str | torch.device | None = None, resume: TrainingCheckpoint | None = None,
             context: dict[str, Any] | None = None, world: World = SINGLE,
             cache: MeasurementCache | None = None) -> FinetuneResult:
    """Fine-tune `model` on `data`; `context` (job, model and data set ids, the model's sha256)
    goes into the result's provenance as given. `resume`: a checkpoint of this run to go on from
    (`model` is still the input model). `world`: run as one rank of several
    (core.engine.distributed); every rank calls this with the same arguments, trains on its shard
    of each global batch and validates its shard of the validation images. `cache`: where the
    final evaluation may find the input model's measurement made by an earlier run on the same
    model, test images and settings (a sweep's siblings), and stores it (core.engine.cache);
    provenance.reused says what it took from there. None: everything is measured here."""
    hooks = hooks or Hooks()
    run = setup(config, model, data, hooks, device=device, world=world)
    state = start(run, hooks) if resume is None else restore(run, resume)
    partial = PartialEpoch.of(resume)
    if not state.stopped:
        for epoch in range(state.epoch + 1, run.epochs + 1):
            row = train_epoch(run, state, epoch, hooks, partial)
            partial = None
            if row is None:
                break
            select(run, state, row, hooks)
    last_state = _state_copy(run.model)
    if state.best_epoch == 0 and not state.stopped:
        _warn(state, hooks, _unchanged_message(run), {"improved": False, "best_epoch": 0})
    outcome = final_evaluation(run, state, hooks, cache)
    _report_outcome(state, hooks, outcome)
    return FinetuneResult(
        best_epoch=state.best_epoch, epochs_completed=state.epoch, stopped=state.stopped,
        before=outcome.before if outcome else None, after=outcome.after if outcome else None,
        validation={"before": state.before, "best": state.best_metrics, "last": state.last_metrics},
        history=state.history, best_model_state=state.best_state, last_model_state=last_state,
        config=run.config.model_dump(mode="json"), selection=_selection_record(run, state), warnings=state.warnings,
        provenance=provenance(run, state, context, resumed=resume is not None,
                              reused=outcome.reused if outcome else None),
        verdict=outcome.verdict if outcome else verdicts.stopped(state.epoch),
        change_ci95=outcome.change_ci95 if outcome else {}, audit=outcome.audit if outcome else [])


def _warn(state: TrainingState, hooks: Hooks, message: str, data: dict[str, Any]) -> None:
    state.warnings.append(message)
    hooks.warn(message, data)


def _unchanged_message(run: Run) -> str:
    rule, delta = run.config.selection, run.threat.delta
    limit = ("no limit on the clean accuracy" if rule.max_clean_drop is None
             else f"clean accuracy allowed to drop by at most {rule.max_clean_drop}")
    return (f"no fine-tuned epoch beat the input model on validation {rule.metric} at δ={delta:g} ({limit}); "
            "the best checkpoint is the input model, unchanged.")


def _selection_record(run: Run, state: TrainingState) -> dict[str, Any]:
    rule = run.config.selection
    return {"metric": rule.metric, "max_clean_drop": rule.max_clean_drop, "split": "validation",
            "candidates": f"epochs 0-{state.epoch} (0 = the input model)", "best_epoch": state.best_epoch,
            "best_validation_value": state.best_metrics[str(rule.metric)]}
