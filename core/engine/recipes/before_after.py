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
from typing import Any, TypeVar

import numpy as np
import torch

from core.engine import cache as measurement_cache
from core.engine.cache import MeasurementCache
from core.engine.config import CorruptionSpec, EvaluationPreset, FinetuneConfig
from core.engine.data.sampling import stratified_indices
from core.engine.device import Compute
from core.engine.evaluation import corruptions
from core.engine.evaluation.audit import audit_status, masking_audit, transfer_check
from core.engine.evaluation.ensemble import PRESETS, Member, Outcome, W2EnsembleResult, w2_ensemble
from core.engine.evaluation.intervals import accuracy_stat, paired_change
from core.engine.evaluation.perclass import confusion_matrix, per_class
from core.engine.evaluation.pointwise import PointwiseResult, pointwise_attack
from core.engine.hooks import Stages
from core.engine.oom import AdaptiveBatch
from core.engine.recipes import verdict as verdicts
from core.engine.threats import Threat

T = TypeVar("T")
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
    """One model on the test sample: the report's numbers and the per-image outcomes behind them.
    `ensemble` carries what the masking audit reads (a cached one has no per-step runs)."""

    metrics: dict[str, Any]
    outcomes: dict[str, torch.Tensor] = field(repr=False)    # accuracy key → per-image correct
    ensemble: W2EnsembleResult = field(repr=False)
    pointwise_accuracy: float
    warnings: list[str]                                       # the ensemble's (attacks that hit their step cap)

    def to_entry(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and header for core.engine.cache.pack (from_entry reads them back)."""
        e = self.ensemble
        tensors = {f"outcome/{k}": v for k, v in self.outcomes.items()}
        tensors.update({"clean_correct": e.clean_correct, "clean_pred": e.clean_pred})
        tensors.update({f"attack/{i}": o.correct for i, o in enumerate(e.outcomes)})
        return tensors, {"entry": "before", "metrics": self.metrics, "warnings": self.warnings,
                         "pointwise_accuracy": self.pointwise_accuracy, "outcomes": list(self.outcomes),
                         "ensemble": {"threat": e.threat, "delta": e.delta, "preset": e.preset, "settings": e.settings,
                                      "attacks": [[o.name, o.kind, o.loss] for o in e.outcomes]}}

    @classmethod
    def from_entry(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], test: HeldOutSet) -> Measurement:
        """A measurement back from to_entry's tensors and header, on the test sample's device;
        KeyError or ValueError when the entry does not fit the sample."""
        n, device = int(test.x.shape[0]), test.y.device

        def vector(name: str, dtype: torch.dtype) -> torch.Tensor:
            t = tensors[name]
            if t.dtype != dtype or tuple(t.shape) != (n,):
                raise ValueError(f"{name}: {t.dtype} {tuple(t.shape)}, not {dtype} ({n},)")
            return t.to(device)

        e = meta["ensemble"]
        outcomes = [Outcome(name=name, kind=kind, correct=vector(f"attack/{i}", torch.bool), loss=loss)
                    for i, (name, kind, loss) in enumerate(e["attacks"])]
        ensemble = W2EnsembleResult(threat=e["threat"], delta=e["delta"], preset=e["preset"],
                                    clean_correct=vector("clean_correct", torch.bool),
                                    clean_pred=vector("clean_pred", test.y.dtype), outcomes=outcomes,
                                    settings=e["settings"])
        return cls(dict(meta["metrics"]), {k: vector(f"outcome/{k}", torch.bool) for k in meta["outcomes"]},
                   ensemble, float(meta["pointwise_accuracy"]), [str(w) for w in meta["warnings"]])


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
    return Measurement(_metrics(threat, test, ensemble, point, outcomes), outcomes, ensemble, point.robust_accuracy,
                       ensemble.warnings())


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
    reused: dict[str, Any] | None = None      # with a cache: what was read back, and the keys (SharedWork)


class SharedWork:
    """What the final evaluation may take from a MeasurementCache (core.engine.cache) instead of
    measuring it: the input model's before-measurement, the corrupted test images and the input
    model's outcomes on them. Each entry's key holds everything its numbers depend on; `reused`
    says what was read back and under which keys (the result's provenance.reused)."""

    def __init__(self, cache: MeasurementCache, model: torch.nn.Module, input_state: dict[str, torch.Tensor],
                 test: HeldOutSet) -> None:
        config, compute = test.config, test.compute
        self.cache = cache
        self.model = measurement_cache.model_digest(model, input_state)
        self.measuring = {   # what a measurement of this model on this device depends on, besides the images
            "device": compute.device.type, "precision": "bf16" if compute.amp_dtype is not None else "float32",
            "channels_last": compute.channels_last, "float32_stem": compute.float32_stem,
            "gpu": torch.cuda.get_device_name(compute.device) if compute.device.type == "cuda" else None,
            "num_classes": test.num_classes, "class_names": list(test.class_names or []) or None}
        self.before_key = measurement_cache.key(
            "before", model=self.model, images=measurement_cache.tensor_digest([("x", test.x), ("y", test.y)]),
            threat={"kind": test.threat.kind, **test.threat.labels()}, evaluation=config.evaluation,
            test_wpgd_steps=config.test_wpgd_steps, test_pgd_steps=config.test_pgd_steps, seed=config.seed,
            wpgd_step_ratio=WPGD_STEP_RATIO, pgd_step_ratio=PGD_STEP_RATIO, **self.measuring)
        self.reused: dict[str, Any] = {"before": False, "keys": {"before": self.before_key}}

    def _read(self, part: str, entry_key: str, parse: Callable[[dict[str, torch.Tensor], dict[str, Any]], T | None],
              kind: str) -> T | None:
        """The entry of `part` parsed, or None (a miss, or an entry that does not fit: measured afresh)."""
        entry = measurement_cache.read(self.cache, entry_key)
        found = None
        if entry is not None and entry[1].get("entry") == kind:
            try:
                found = parse(*entry)
            except (KeyError, ValueError, TypeError):
                found = None
        self.reused[part] = found is not None
        return found

    def before(self, test: HeldOutSet) -> Measurement | None:
        return self._read("before", self.before_key, lambda t, m: Measurement.from_entry(t, m, test), "before")

    def keep_before(self, before: Measurement) -> None:
        measurement_cache.write(self.cache, self.before_key, measurement_cache.pack(*before.to_entry()))

    def corruption_keys(self, images: torch.Tensor, labels: torch.Tensor, image_ids: np.ndarray,
                        spec: CorruptionSpec, seed: int) -> tuple[str, str]:
        """The keys of the corrupted images and of the input model's outcomes on them."""
        made = {"images": measurement_cache.tensor_digest([("x", images)]), "image_ids": image_ids.tolist(),
                "spec": {"types": list(spec.types), "severities": list(spec.severities), "n": spec.n_examples},
                "seed": seed, "versions": corruptions.versions()}
        images_key = measurement_cache.key("corrupted_images", **made)
        result_key = measurement_cache.key("input_corruptions", images_key=images_key, model=self.model,
                                           labels=measurement_cache.tensor_digest([("y", labels)]), **self.measuring)
        self.reused["keys"].update(corrupted_images=images_key, input_corruptions=result_key)
        return images_key, result_key

    def corrupted(self, images_key: str, images: torch.Tensor,
                  spec: CorruptionSpec) -> corruptions.CorruptedImages | None:
        return self._read("corrupted_images", images_key,
                          lambda t, m: corruptions.CorruptedImages.from_entry(t, m, images, spec), "corrupted_images")

    def input_corruptions(self, result_key: str, spec: CorruptionSpec, seed: int,
                          n: int) -> corruptions.CorruptionResult | None:
        return self._read("input_corruptions", result_key,
                          lambda t, m: corruptions.result_from_entry(t, m, spec, seed, n), "corruption_result")

    def keep(self, entry_key: str, entry: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
        measurement_cache.write(self.cache, entry_key, measurement_cache.pack(*entry))


def compare(model: torch.nn.Module, input_state: dict[str, torch.Tensor], best_state: dict[str, torch.Tensor],
            best_epoch: int, test: HeldOutSet, unchanged_message: str, progress: Progress,
            cache: MeasurementCache | None = None) -> BeforeAfter | None:
    """Measure the input model and (when it differs) the checkpoint on the test sample, pair their
    outcomes, audit the checkpoint and decide the verdict. `model` is the run's module: its
    weights are replaced. None when a cancel cut the measurement short. `progress(share, phase)`
    follows the stages by their cost (stage_costs), and the attacks inside them step by step.
    `cache`: the input model's measurement (and the corrupted images) are read from it when a run
    on the same model, images and settings stored them, and stored there otherwise (SharedWork)."""
    shared = SharedWork(cache, model, input_state, test) if cache is not None else None
    cached = shared.before(test) if shared is not None else None
    cost = stage_costs(test.config, test.compute.device.type)
    spec = test.config.corruption_spec
    corruption_cost = corruptions.passes(spec, 2 if best_epoch > 0 else 1)
    stages = Stages(progress, measurement_passes(test.config, test.compute.device.type, best_epoch > 0)
                    + corruption_cost - (cost[POINTWISE] + cost[ENSEMBLE] if cached is not None else 0))

    def start_as(prefix: str) -> Start:
        return lambda stage: stages.stage(cost[stage], f"{prefix}{stage}")

    model.load_state_dict(input_state)
    before = cached or measure(model.eval(), test, start_as("input model: "))
    model.eval()                    # a read-back measurement leaves the module as the audit needs it too
    if before is None:
        return None
    if shared is not None and cached is None:
        shared.keep_before(before)
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
    warnings = [f"on the test set ({which}): {line}" for which, m in measured for line in m.warnings]
    if spec is not None:
        skipped = _corruptions(model, input_state, [m for _, m in measured], test, spec,
                               stages.stage(corruption_cost, "common corruptions"), shared)
        if skipped is False:
            return None
        if isinstance(skipped, str):
            warnings.append(f"on the test set: {skipped}")
    verdict = _verdict(before, after, changes, audit, best_epoch, test.config, unchanged_message)
    return BeforeAfter(before.metrics, after.metrics, {k: c["ci95"] for k, c in changes.items()}, audit, verdict,
                       warnings, shared.reused if shared is not None else None)


def _corruptions(model: torch.nn.Module, input_state: dict[str, torch.Tensor], measured: list[Measurement],
                 test: HeldOutSet, spec: CorruptionSpec, at: Callable[[float, str | None], None],
                 shared: SharedWork | None = None) -> str | bool | None:
    """Both models (the module holds the returned weights) on the same corrupted test images: each
    measurement's metrics get the block (the checkpoint's with `versus_input`) and its headline
    numbers. With `shared`, the corrupted images and the input model's outcomes on them are read
    from its cache when there, and stored there when not. Returns the line naming the skipped
    cells (None: none), False when cancelled."""
    images = (test.x.float() * 255).round().to("cpu", torch.uint8).contiguous()   # exactly the uint8 images
    keep = np.arange(images.shape[0])
    if spec.n_examples is not None:
        keep = stratified_indices(test.y.cpu().numpy(), spec.n_examples, test.config.seed)
    picked = torch.from_numpy(keep)
    sample, labels, seed = images[picked], test.y.cpu()[picked], test.config.seed
    prepared = collect = input_result = None
    if shared is not None:
        images_key, result_key = shared.corruption_keys(sample, labels, keep, spec, seed)
        input_result = shared.input_corruptions(result_key, spec, seed, int(sample.shape[0]))
        prepared = shared.corrupted(images_key, sample, spec)
        if prepared is None and corruptions.CorruptedImages.nbytes(sample, spec) <= shared.cache.max_entry_bytes:
            collect = corruptions.CorruptedImages()
    models = [model.eval()]
    if len(measured) > 1 and input_result is None:     # the checkpoint differs from the input model
        source = copy.deepcopy(model)
        source.load_state_dict(input_state)
        models.insert(0, source.eval())
    if len(measured) == 1 and input_result is not None:
        models = []                  # the returned model is the input model, whose outcomes were read back
    results = corruptions.measure_corruptions(
        models, sample, labels, spec, seed=seed, image_ids=keep, compute=test.compute, batch_size=test.batch,
        should_stop=test.should_stop, prepared=prepared, keep=collect,
        progress=lambda done, phase: at(done, phase.removeprefix("corruptions: "))) if models else []
    if results is None:
        return False
    if shared is not None:
        if input_result is None:
            shared.keep(result_key, corruptions.result_entry(results[0]))
        if collect is not None and models:
            shared.keep(images_key, collect.to_entry())
    results = ([input_result] if input_result is not None else []) + results
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
                           step_ratio=WPGD_STEP_RATIO, pointwise_accuracy=after.pointwise_accuracy,
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
