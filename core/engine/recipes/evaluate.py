"""Robustness evaluation, one readable recipe:

    a seeded stratified sample of the test split → for each radius δ: the pointwise attack
    (AutoAttack / APGD / PGD) → the W2 ensemble (W-PGD attacks run to convergence, the pointwise
    set as a member) → at the headline δ: the masking audit, per-class numbers and the confusion
    matrix → (when asked) accuracy under the common corruptions → a JSON report and a PNG of
    accuracy against δ (and per corruption type)

Every number is labelled with the radius and threat model it measures, the preset that measured it
(`evaluation`: standard or quick, core.engine.evaluation.ensemble.PRESETS), and carries n and a
95 % Wilson interval. The headline (summary) is at the threat model's δ when that δ is among the
radii, else at the largest radius, and it says which. W2 ≤ pointwise holds by construction: the
pointwise attack's points are a member of the W2 ensemble. Attacks run in float32 unless bf16 is
asked for (`amp`): bf16 weakens W-PGD.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from core.engine.config import CorruptionSpec, EvaluateConfig
from core.engine.data.datasets import ImageData, to_unit_float
from core.engine.data.sampling import sample_record, stratified_indices
from core.engine.defaults import resolve_eval_batch_size
from core.engine.device import Compute
from core.engine.evaluation import corruptions
from core.engine.evaluation.audit import audit_status, masking_audit
from core.engine.evaluation.ensemble import PRESETS, Member, W2EnsembleResult, preset_attacks, w2_ensemble
from core.engine.evaluation.intervals import accuracy_stat
from core.engine.evaluation.invariants import check_report
from core.engine.evaluation.perclass import confusion_matrix, per_class
from core.engine.evaluation.pointwise import PointwiseResult, pointwise_attack
from core.engine.hooks import Hooks
from core.engine.oom import AdaptiveBatch, report_halving
from core.engine.plots import CorruptionBars, robustness_curve_png
from core.engine.provenance import runtime_provenance, utc_timestamp
from core.engine.threats import Threat


@dataclass
class EvaluationReport:
    config: dict[str, Any]
    n_examples: int
    clean_accuracy: float
    w2: list[dict[str, Any]] = field(default_factory=list)         # one W2 ensemble row per δ
    pointwise: list[dict[str, Any]] = field(default_factory=list)  # one row per pointwise attack and δ
    stopped: bool = False
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    clean: dict[str, Any] = field(default_factory=dict)            # accuracy, n, ci95
    audit: list[dict[str, str]] = field(default_factory=list)      # the masking audit at the headline δ
    per_class: list[dict[str, Any]] = field(default_factory=list)  # at the headline δ
    confusion_matrix: list[list[int]] = field(default_factory=list)  # [true][predicted], clean
    corruptions: dict[str, Any] | None = None                      # the common corruptions, when asked

    @property
    def headline(self) -> dict[str, Any] | None:
        """The W2 row at the headline radius (EvaluateConfig.headline_delta)."""
        delta, _ = EvaluateConfig.model_validate(self.config).headline_delta
        return next((r for r in self.w2 if _same(r["delta"], delta)), None)

    @property
    def summary(self) -> dict[str, Any]:
        """Headline metrics, with the radius and threat models they measure, why that radius, the
        preset, n and every accuracy's 95 % interval (`<metric>_ci95`)."""
        config = EvaluateConfig.model_validate(self.config)
        delta, source = config.headline_delta
        threat = Threat.from_spec(config.threat_model, delta)
        out: dict[str, Any] = {**threat.labels(), "delta_source": source, "evaluation": config.evaluation,
                               "n_examples": self.n_examples, "clean_accuracy": self.clean_accuracy,
                               "clean_accuracy_ci95": self.clean.get("ci95")}
        if self.audit:
            out["audit"] = audit_status(self.audit)
        row = self.headline
        if row is None:
            return out
        out.update(w2_robust_accuracy=row["robust_accuracy"], w2_robust_accuracy_ci95=row["ci95"],
                   w2_robust_to_clean_ratio=row["robust_to_clean_ratio"], w2_converged=row["converged"],
                   w2_attack=row["attack"])
        at_delta = [p for p in self.pointwise if _same(p["delta"], row["delta"])]
        if at_delta:
            strongest = min(at_delta, key=lambda p: p["robust_accuracy"])
            ground = strongest["threat"]
            out[f"{ground}_robust_accuracy"] = strongest["robust_accuracy"]
            out[f"{ground}_robust_accuracy_ci95"] = strongest["ci95"]
            out[f"{ground}_robust_to_clean_ratio"] = strongest["robust_to_clean_ratio"]
            out[f"{ground}_attack"] = strongest["attack"]
        if self.corruptions is not None:
            out.update(corruptions.metrics(self.corruptions))
        return out

    def to_dict(self) -> dict[str, Any]:
        return check_report({
            "type": "evaluate", "summary": self.summary, "warnings": self.warnings, "config": self.config,
            "provenance": self.provenance, "n_examples": self.n_examples,
            "clean_accuracy": self.clean_accuracy, "clean": self.clean, "w2": self.w2,
            "pointwise": self.pointwise, "audit": self.audit, "per_class": self.per_class,
            "confusion_matrix": self.confusion_matrix, "stopped": self.stopped,
            **({"corruptions": self.corruptions} if self.corruptions is not None else {})})

    def plot_png(self) -> bytes:
        preset = self.config.get("evaluation", "standard")
        series: dict[str, Sequence[float]] = {f"W2 ({preset} ensemble)": [r["robust_accuracy"] for r in self.w2]}
        names = list(dict.fromkeys(p["attack"] for p in self.pointwise))
        for name in names:
            rows = [p for p in self.pointwise if p["attack"] == name]
            if len(rows) == len(self.w2):
                series[f"{rows[0]['threat']} ({name})"] = [p["robust_accuracy"] for p in rows]
        return robustness_curve_png([r["delta"] for r in self.w2], series, self.clean_accuracy,
                                    "robust accuracy against the radius",
                                    corruptions=CorruptionBars.of({"this model": self.corruptions}))


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * max(1.0, b)


def evaluate(config: EvaluateConfig, model: torch.nn.Module, data: ImageData, hooks: Hooks | None = None,
             *, device: str | torch.device | None = None, context: dict[str, Any] | None = None) -> EvaluationReport:
    """Evaluate `model` on a stratified sample of the test split; `context` (job, model and data
    set ids, the model's sha256) goes into the report's provenance as given."""
    hooks = hooks or Hooks()
    started_at = utc_timestamp()
    # the finest attack step taken: under bf16 a step below bf16's input spacing keeps the stem in float32
    finest_step = min(config.wpgd_step_ratio * min(config.radii) / config.wpgd_steps,
                      config.pgd_step_ratio * min(config.radii))
    compute = Compute.resolve(device, config.amp, config.channels_last, attack_step=finest_step)
    model = compute.prepare_model(model).eval()
    labels = data.test_y.numpy()
    indices = stratified_indices(labels, config.n_examples, config.seed)
    chosen = torch.from_numpy(indices)
    x = compute.images(to_unit_float(data.test_x[chosen], compute.device))
    y = data.test_y[chosen].to(compute.device)
    n = int(x.shape[0])
    batch_size = resolve_eval_batch_size(config.batch_size, compute.device.type, tuple(x.shape[1:]))
    base = Threat.from_spec(config.threat_model)
    w2_base = base.w2
    headline_delta = config.headline_delta[0]
    point_names: list[str] = (list(dict.fromkeys(config.linf_attacks)) if config.linf_attacks is not None
                   else [PRESETS[config.evaluation].pointwise(compute.device.type)])
    spec = config.corruption_spec
    units = len(config.radii) * (1 + len(point_names)) + (1 if config.audit else 0) + (1 if spec else 0)
    progress = _Progress(hooks, units)
    report = EvaluationReport(config=config.model_dump(mode="json"), n_examples=n, clean_accuracy=0.0)
    batch = AdaptiveBatch(batch_size, report_halving(hooks.event))
    head: tuple[W2EnsembleResult, list[PointwiseResult]] | None = None

    for delta in config.radii:
        points = []
        for name in point_names:
            points.append(pointwise_attack(
                model, x, y, w2_base.pointwise.with_delta(delta), name, batch_size=batch, compute=compute,
                seed=config.seed, steps=config.pgd_steps, step_ratio=config.pgd_step_ratio, loss=config.pgd_loss,
                on_attack=lambda attack, k, total: progress.within(k / total, f"autoattack: {attack}"),
                progress=progress.steps(f"{name} δ={delta:.4g}"),
                should_stop=hooks.should_stop))
            report.pointwise.append(points[-1].to_dict())
            progress.unit_done(f"{name} δ={delta:.4g}",
                               {f"{w2_base.ground}_robust_accuracy": points[-1].robust_accuracy})
            if hooks.should_stop():
                return _stopped(report, config, n, compute, context, started_at, batch_size, indices, labels)
        ensemble = w2_ensemble(
            model, x, y, w2_base.with_delta(delta), preset=config.evaluation, batch_size=batch, compute=compute,
            seed=config.seed, steps=config.wpgd_steps, step_ratio=config.wpgd_step_ratio,
            attacks=preset_attacks(config.evaluation, config.attack_loss), progress=progress.within,
            should_stop=hooks.should_stop, members=[Member.of(p) for p in points])
        report.clean = accuracy_stat(ensemble.clean_correct)
        report.clean_accuracy = report.clean["accuracy"]
        if ensemble.stopped:
            return _stopped(report, config, n, compute, context, started_at, batch_size, indices, labels)
        report.w2.append(ensemble.to_dict())
        for message in ensemble.warnings():
            report.warnings.append(message)
            hooks.warn(message, {"delta": delta})
        progress.unit_done(f"w-pgd δ={delta:.4g}", {"clean_accuracy": report.clean_accuracy,
                                                    "w2_robust_accuracy": ensemble.robust_accuracy, "delta": delta})
        if _same(delta, headline_delta):
            head = (ensemble, points)

    if head is not None:
        ensemble, points = head
        strongest = min(points, key=lambda p: p.robust_accuracy) if points else None
        if config.audit:
            report.audit = masking_audit(
                model, x, y, w2_base.with_delta(headline_delta), ensemble=ensemble, compute=compute,
                batch_size=batch, seed=config.seed, steps=config.wpgd_steps, step_ratio=config.wpgd_step_ratio,
                pointwise_accuracy=strongest.robust_accuracy if strongest else None,
                progress=progress.within, should_stop=hooks.should_stop)
            if hooks.should_stop():   # the audit was cut short: its checks are not to be kept
                report.audit = []
                return _stopped(report, config, n, compute, context, started_at, batch_size, indices, labels)
            progress.unit_done("audit", {"audit": audit_status(report.audit)})
            _warn_on_failed_audit(report, hooks)
        outcomes = {"clean_accuracy": ensemble.clean_correct, "w2_robust_accuracy": ensemble.correct}
        if strongest is not None:
            outcomes[f"{strongest.threat}_robust_accuracy"] = strongest.correct
        report.per_class = per_class(y, outcomes, data.num_classes, data.class_names)
        report.confusion_matrix = confusion_matrix(y, ensemble.clean_pred, data.num_classes)
    if spec is not None:
        report.corruptions = _corruptions(spec, config.seed, model, data, indices, compute, batch, progress, hooks)
        if report.corruptions is None:
            return _stopped(report, config, n, compute, context, started_at, batch_size, indices, labels)
        progress.unit_done("corruptions", corruptions.metrics(report.corruptions))
        skipped = corruptions.skipped_words(report.corruptions)
        if skipped:
            report.warnings.append(skipped)
            hooks.warn(skipped, {"corruptions_skipped": report.corruptions["skipped"]})
    report.provenance = _provenance(config, n, compute, context, started_at, batch_size, indices, labels,
                                    point_names)
    hooks.progress(1.0, "done", report.summary)
    return report


class _Progress:
    """The recipe's share of work done: `units` equal parts (an attack at a radius, the audit),
    with `within(fraction, phase)` inside the current one."""

    def __init__(self, hooks: Hooks, units: int) -> None:
        self.hooks, self.units, self.done = hooks, max(units, 1), 0

    def within(self, fraction: float, phase: str) -> None:
        self.hooks.progress(min(1.0, (self.done + fraction) / self.units), phase, {})

    def steps(self, phase: str) -> Callable[[int, int], None]:
        """An attack's `(steps done, steps in all)` as progress inside the current unit."""
        return lambda done, total: self.within(done / total, phase)

    def unit_done(self, phase: str, metrics: dict[str, Any]) -> None:
        self.done += 1
        self.hooks.progress(min(1.0, self.done / self.units), phase, metrics)


def _corruptions(spec: CorruptionSpec, seed: int, model: torch.nn.Module, data: ImageData, indices: Any,
                 compute: Compute, batch: AdaptiveBatch, progress: _Progress, hooks: Hooks) -> dict[str, Any] | None:
    """The corruption block on the evaluated sample (or spec.n_examples of it, a stratified
    sample); each image seeded by its index in the test split. None when cancelled."""
    chosen = np.asarray(indices)
    if spec.n_examples is not None:
        chosen = chosen[stratified_indices(data.test_y.numpy()[chosen], spec.n_examples, seed)]
    picked = torch.from_numpy(chosen)
    results = corruptions.measure_corruptions(
        [model], data.test_x[picked], data.test_y[picked], spec, seed=seed, image_ids=chosen, compute=compute,
        batch_size=batch, progress=progress.within, should_stop=hooks.should_stop)
    if results is None:
        return None
    return results[0].to_dict()


def _warn_on_failed_audit(report: EvaluationReport, hooks: Hooks) -> None:
    failed = [c for c in report.audit if c["status"] == "fail"]
    if failed:
        message = ("the masking audit failed (" + "; ".join(f"{c['check']}: {c['detail']}" for c in failed)
                   + "): the robust accuracies may be far too high, as for a model that hides its gradients.")
        report.warnings.append(message)
        hooks.warn(message, {"audit": "fail", "checks": [c["check"] for c in failed]})


def _stopped(report: EvaluationReport, config: EvaluateConfig, n: int, compute: Compute,
             context: dict[str, Any] | None, started_at: str, batch_size: int, indices: Any,
             labels: Any) -> EvaluationReport:
    report.stopped = True
    report.provenance = _provenance(config, n, compute, context, started_at, batch_size, indices, labels, [])
    return report


def _provenance(config: EvaluateConfig, n: int, compute: Compute, context: dict[str, Any] | None,
                started_at: str, batch_size: int, indices: Any, labels: Any, point_names: list[str]) -> dict[str, Any]:
    preset = PRESETS[config.evaluation]
    return {**(context or {}), "seed": config.seed, "examples": {"test": n},
            "test_sample": sample_record(labels, indices, config.seed),
            "evaluation": {"preset": config.evaluation, **preset.describe(),
                           "w2_attacks": [a.name for a in preset_attacks(config.evaluation, config.attack_loss)],
                           "pointwise_attacks": point_names},
            **runtime_provenance(compute.device),
            "evaluation_precision": "bf16" if compute.amp_dtype is not None else "float32",
            "float32_stem": compute.float32_stem,
            # the batch the attacks ran with: config.batch_size resolved on this device ("auto")
            "batch_size": batch_size,
            "started_at": started_at, "finished_at": utc_timestamp()}
