"""A fine-tune's reported numbers: the input model and the returned checkpoint on the test split.

    for each model: the pointwise attack (the preset's: AutoAttack / APGD / PGD) → the W2 ensemble
    with the pointwise set as a member (so W2 ≤ pointwise by construction) → per-class accuracies
    and the confusion matrix
    → the paired change of every accuracy (a bootstrap over the same test images)
    → the masking audit of the returned checkpoint, with the transfer check (an attack crafted
      on the input model, applied to the checkpoint)
    → (config.corruptions) both models on the same corrupted copies of the test sample, and the
      checkpoint's corruption error relative to the input model (core.engine.evaluation.corruptions);
      reported beside the verdict, which they do not decide
    → the verdict (core.engine.recipes.verdict)

The test split is touched here only, once the checkpoint is chosen: the numbers played no part
in the choice. Every accuracy carries n and a 95 % Wilson interval (`<metric>_ci95`); the preset
(`evaluation`) is named in each set of numbers. The measurement runs in one process on the whole
test sample: across ranks every rank measures it alike (no collectives, so a cancel cannot
leave one rank waiting on another), and rank 0 reports.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from core.engine.config import CorruptionSpec, EvaluationPreset, FinetuneConfig
from core.engine.data.sampling import stratified_indices
from core.engine.device import Compute
from core.engine.evaluation import corruptions
from core.engine.evaluation.audit import audit_status, masking_audit, transfer_check
from core.engine.evaluation.ensemble import PRESETS, Member, W2EnsembleResult, w2_ensemble
from core.engine.evaluation.intervals import accuracy_stat, paired_change
from core.engine.evaluation.perclass import confusion_matrix, per_class
from core.engine.evaluation.pointwise import PointwiseResult, pointwise_attack
from core.engine.hooks import Stages
from core.engine.oom import AdaptiveBatch
from core.engine.recipes import verdict as verdicts
from core.engine.threats import Threat

Progress = Callable[[float, str], None]   # the share of the final evaluation done, the phase now running
Start = Callable[[str], Callable[[float, str | None], None]]   # starts a stage: its (share done, detail)
PGD_STEP_RATIO = 0.25                # l∞ PGD step as a share of δ (EvaluateConfig's default)
WPGD_STEP_RATIO = 1.875              # W-PGD step α = ratio·δ/test_wpgd_steps (EvaluateConfig's default)
APGD_PASSES = 100                    # about the passes per image of one AutoAttack / APGD attack (for progress)
POINTWISE, ENSEMBLE, AUDIT, TRANSFER = ("pointwise attack", "W2 ensemble", "masking audit",
                                        "masking audit: transfer from the input model")


def stage_costs(config: FinetuneConfig, device_type: str) -> dict[str, float]:
    """About the forward/backward passes per test image of each stage of the measurement, for
    progress and its ETA only: the pointwise attack, the W2 ensemble (each attack about its nominal
    steps + patience), the masking audit (two W-PGD runs, a short one, random draws) and the transfer check."""
    spec, steps = PRESETS[config.evaluation], config.test_wpgd_steps
    pointwise = spec.pointwise(device_type)
    aa_attacks = 2 if pointwise == "apgd" else 4        # APGD-CE + APGD-T, or the whole AutoAttack
    return {POINTWISE: config.test_pgd_steps + 1 if pointwise == "pgd" else APGD_PASSES * aa_attacks,
            ENSEMBLE: len(spec.attacks) * (steps + spec.patience) + 1,
            AUDIT: 2 * (steps + PRESETS["quick"].patience) + max(1, steps // 5) + 4,
            TRANSFER: steps + 1}


def measurement_passes(config: FinetuneConfig, device_type: str, checkpoint: bool = True) -> float:
    """About the passes per test image of the whole measurement: the input model, the checkpoint
    (when it is not the input), the audit and (then) the transfer check."""
    cost = stage_costs(config, device_type)
    models = 2 if checkpoint else 1
    return models * (cost[POINTWISE] + cost[ENSEMBLE]) + cost[AUDIT] + (cost[TRANSFER] if checkpoint else 0)


@dataclass
class Measurement:
    """One model on the test sample: the report's numbers and the per-image outcomes behind them."""

    metrics: dict[str, Any]
    outcomes: dict[str, torch.Tensor] = field(repr=False)    # accuracy key → per-image correct
    ensemble: W2EnsembleResult = field(repr=False)
    point: PointwiseResult = field(repr=False)


@dataclass
class HeldOutSet:
    """The test sample on the device and what measuring it needs."""

    x: torch.Tensor
    y: torch.Tensor
    threat: Threat                   # the job's threat, in one process
    config: FinetuneConfig
    compute: Compute
    batch: AdaptiveBatch
    num_classes: int
    class_names: Sequence[str] | None = None
    should_stop: Callable[[], bool] | None = None

    @property
    def preset(self) -> EvaluationPreset:
        return self.config.evaluation


def measure(model: torch.nn.Module, test: HeldOutSet, start: Start) -> Measurement | None:
    """The numbers of `model` (eval mode) on the test sample; None when a cancel cut them short.
    `start(stage)` begins each stage's progress (POINTWISE, ENSEMBLE)."""
    config, threat = test.config, test.threat
    ground = threat.ground
    at = start(POINTWISE)
    point = pointwise_attack(model, test.x, test.y, threat.pointwise, PRESETS[test.preset].pointwise(
        test.compute.device.type), batch_size=test.batch, compute=test.compute, seed=config.seed,
        steps=config.test_pgd_steps, step_ratio=PGD_STEP_RATIO, should_stop=test.should_stop,
        progress=lambda done, total: at(done / total, None), on_attack=lambda name, k, count: at(k / count, name))
    if test.should_stop is not None and test.should_stop():
        return None
    at = start(ENSEMBLE)
    ensemble = w2_ensemble(model, test.x, test.y, threat.w2, preset=test.preset, batch_size=test.batch,
                           compute=test.compute, seed=config.seed, steps=config.test_wpgd_steps,
                           step_ratio=WPGD_STEP_RATIO, should_stop=test.should_stop, members=[Member.of(point)],
                           progress=at)
    if ensemble.stopped:
        return None
    outcomes = {"clean_accuracy": ensemble.clean_correct, "w2_robust_accuracy": ensemble.correct,
                f"{ground}_robust_accuracy": point.correct}
    return Measurement(_metrics(threat, test, ensemble, point, outcomes), outcomes, ensemble, point)


def _metrics(threat: Threat, test: HeldOutSet, ensemble: W2EnsembleResult, point: PointwiseResult,
             outcomes: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The before/after dict: the keys the per-epoch validation rows use, each accuracy's ci95,
    the attacks behind each number, per-class numbers and the confusion matrix."""
    ground = threat.ground
    row: dict[str, Any] = {**threat.labels(), "evaluation": test.preset, "n_examples": int(test.x.shape[0])}
    for key, correct in outcomes.items():
        stat = accuracy_stat(correct)
        row[key], row[f"{key}_ci95"] = stat["accuracy"], stat["ci95"]
    clean = row["clean_accuracy"]
    for key in ("w2", ground):
        row[f"{key}_robust_to_clean_ratio"] = row[f"{key}_robust_accuracy"] / clean if clean > 0 else 0.0
    ensemble_row = ensemble.to_dict()
    row.update({"w2_attack": ensemble.best.name, "w2_converged": ensemble.converged, f"{ground}_attack": point.name,
                "sensitivity": ensemble_row.get("sensitivity"),
                "w2": ensemble_row, "pointwise": point.to_dict(),
                "per_class": per_class(test.y, outcomes, test.num_classes, test.class_names),
                "confusion_matrix": confusion_matrix(test.y, ensemble.clean_pred, test.num_classes)})
    return row


@dataclass
class BeforeAfter:
    """The reported numbers of a finished run."""

    before: dict[str, Any]
    after: dict[str, Any]
    change_ci95: dict[str, list[float]]       # accuracy key → paired 95 % interval of after − before
    audit: list[dict[str, str]]
    verdict: verdicts.Verdict
    warnings: list[str]


def compare(model: torch.nn.Module, input_state: dict[str, torch.Tensor], best_state: dict[str, torch.Tensor],
            best_epoch: int, test: HeldOutSet, unchanged_message: str, progress: Progress) -> BeforeAfter | None:
    """Measure the input model and (when it differs) the checkpoint on the test sample, pair their
    outcomes, audit the checkpoint and decide the verdict. `model` is the run's module: its
    weights are replaced. None when a cancel cut the measurement short. `progress(share, phase)`
    follows the stages by their cost (stage_costs), and the attacks inside them step by step."""
    cost = stage_costs(test.config, test.compute.device.type)
    spec = test.config.corruption_spec
    corruption_cost = corruptions.passes(spec, 2 if best_epoch > 0 else 1)
    stages = Stages(progress, measurement_passes(test.config, test.compute.device.type, best_epoch > 0)
                    + corruption_cost)

    def start_as(prefix: str) -> Start:
        return lambda stage: stages.stage(cost[stage], f"{prefix}{stage}")

    model.load_state_dict(input_state)
    before = measure(model.eval(), test, start_as("input model: "))
    if before is None:
        return None
    after: Measurement | None = before
    if best_epoch > 0:
        model.load_state_dict(best_state)
        after = measure(model.eval(), test, start_as(f"checkpoint of epoch {best_epoch}: "))
    if after is None:
        return None
    changes = {k: paired_change(before.outcomes[k], after.outcomes[k], seed=test.config.seed) for k in after.outcomes}
    audit = _audit(model, input_state, after, best_epoch, test, start_as(""))
    if audit is None:
        return None
    measured = [("before", before)] + ([("after", after)] if best_epoch > 0 else [])
    warnings = [f"on the test set ({which}): {line}" for which, m in measured for line in m.ensemble.warnings()]
    if spec is not None:
        skipped = _corruptions(model, input_state, [m for _, m in measured], test, spec,
                               stages.stage(corruption_cost, "common corruptions"))
        if skipped is False:
            return None
        if isinstance(skipped, str):
            warnings.append(f"on the test set: {skipped}")
    verdict = _verdict(before, after, changes, audit, best_epoch, test.config, unchanged_message)
    return BeforeAfter(before.metrics, after.metrics, {k: c["ci95"] for k, c in changes.items()}, audit, verdict,
                       warnings)


def _corruptions(model: torch.nn.Module, input_state: dict[str, torch.Tensor], measured: list[Measurement],
                 test: HeldOutSet, spec: CorruptionSpec, at: Callable[[float, str | None], None]) -> str | bool | None:
    """Both models (the module holds the returned weights) on the same corrupted test images: each
    measurement's metrics get the block (the checkpoint's with `versus_input`) and its headline
    numbers. Returns the line naming the skipped cells (None: none), False when cancelled."""
    models = [model.eval()]
    if len(measured) > 1:           # the checkpoint differs from the input model
        source = copy.deepcopy(model)
        source.load_state_dict(input_state)
        models.insert(0, source.eval())
    images = (test.x.float() * 255).round().to("cpu", torch.uint8).contiguous()   # exactly the uint8 images
    keep = np.arange(images.shape[0])
    if spec.n_examples is not None:
        keep = stratified_indices(test.y.cpu().numpy(), spec.n_examples, test.config.seed)
    picked = torch.from_numpy(keep)
    results = corruptions.measure_corruptions(
        models, images[picked], test.y.cpu()[picked], spec, seed=test.config.seed, image_ids=keep,
        compute=test.compute, batch_size=test.batch, should_stop=test.should_stop,
        progress=lambda done, phase: at(done, phase.removeprefix("corruptions: ")))
    if results is None:
        return False
    for m, result in zip(measured, results, strict=True):
        m.metrics["corruptions"] = result.to_dict()
    if len(results) > 1:
        measured[1].metrics["corruptions"]["versus_input"] = corruptions.versus_input(results[0], results[1])
    for m in measured:
        m.metrics.update(corruptions.metrics(m.metrics["corruptions"]))
    return corruptions.skipped_words(measured[-1].metrics["corruptions"])


def _audit(model: torch.nn.Module, input_state: dict[str, torch.Tensor], after: Measurement, best_epoch: int,
           test: HeldOutSet, start: Start) -> list[dict[str, str]] | None:
    """The masking audit of the returned model (the module holds its weights) and, for a checkpoint
    that is not the input, the transfer check from the input model."""
    w2 = test.threat.w2
    at = start(AUDIT)
    checks = masking_audit(model, test.x, test.y, w2, ensemble=after.ensemble, compute=test.compute,
                           batch_size=test.batch, seed=test.config.seed, steps=test.config.test_wpgd_steps,
                           step_ratio=WPGD_STEP_RATIO, pointwise_accuracy=after.point.robust_accuracy,
                           progress=lambda f, phase: at(f, phase.removeprefix("audit: ")),
                           should_stop=test.should_stop)
    if test.should_stop is not None and test.should_stop():
        return None
    if best_epoch > 0:
        start(TRANSFER)
        source = copy.deepcopy(model)
        source.load_state_dict(input_state)
        checks.append(transfer_check(source.eval(), model, test.x, test.y, w2,
                                     white_box_accuracy=after.ensemble.robust_accuracy, compute=test.compute,
                                     batch_size=test.batch, steps=test.config.test_wpgd_steps,
                                     step_ratio=WPGD_STEP_RATIO))
    return checks


def _verdict(before: Measurement, after: Measurement, changes: dict[str, dict[str, Any]], audit: list[dict[str, str]],
             best_epoch: int, config: FinetuneConfig, unchanged_message: str) -> verdicts.Verdict:
    if best_epoch == 0:
        return verdicts.unchanged(unchanged_message)
    metric = verdicts.VERDICT_METRIC[str(config.selection.metric)]
    guards = verdicts.Guards(
        clean_change=changes["clean_accuracy"]["change"], max_clean_drop=config.selection.max_clean_drop,
        collapsed=verdicts.collapsed(before.metrics["per_class"], after.metrics["per_class"]),
        audit=audit_status(audit))
    return verdicts.decide(metric=metric, change=changes[metric], guards=guards, best_epoch=best_epoch)
