"""How long a job will run, before it runs: a count of its forward/backward passes times a measured
cost per pass. Torch-free, so that the API answers a submit with it (docs/runtimes.md, "Before you
submit: the estimate").

The unit is one image through the model forward and backward (an "image-pass"); a forward alone
counts FORWARD_SHARE of one (a backward costs about twice its forward). `finetune_passes` and
`evaluate_passes` count a job's units per phase from its config and the sizes of its data set, the
way the recipes spend them (core.engine.recipes.finetune, before_after, evaluate; the attacks'
adaptive steps at their nominal T + patience, AutoAttack's targeted and black-box attacks at a
typical share of the images they still attack). The count is machine-independent.

The cost of a unit comes from the workers (worker/devices.py, core/service/calibration.py):
- every worker, when it starts, times a few forward/backward passes of a reference architecture at a
  reference input size (REFERENCE) and records seconds per unit with its heartbeat;
- every job a worker finishes records, for its kind (architecture and input size), the seconds per
  unit it actually took and the time outside the passes (loading data and model, writing artifacts).
A kind's own measurement is what later estimates of that kind use; a kind a worker of a device class
never ran is scaled from another worker's measurement of it by the two workers' reference costs; a
kind no worker ever ran is scaled from the reference by a cost proxy (input pixels and parameters,
`cost_ratio`), which can be several times off: the estimate says which basis it used.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from core.engine.config import EvaluateConfig, FinetuneConfig
from core.engine.defaults import validation_split_size

__all__ = [
    "BASIS_MEASURED",
    "BASIS_REFERENCE",
    "BASIS_SCALED",
    "DEFAULT_OVERHEAD_SECONDS",
    "FORWARD_SHARE",
    "PRESET_FACTS",
    "REFERENCE",
    "WorkerCalibration",
    "combine",
    "cost_ratio",
    "device_type_of",
    "evaluate_passes",
    "finetune_passes",
    "kind_key",
]

FORWARD_SHARE = 1 / 3              # a forward pass alone, as a share of forward + backward

# The evaluation presets as far as the count needs them (core.engine.evaluation.ensemble.PRESETS,
# which imports torch; a test keeps the two the same): W-PGD attacks, patience, step cap, and the
# pointwise attack on a GPU and on a CPU.
PRESET_FACTS: dict[str, dict[str, Any]] = {
    "standard": {"attacks": 3, "patience": 25, "cap": 500, "pointwise": {"cuda": "autoattack", "cpu": "apgd"}},
    "quick": {"attacks": 2, "patience": 10, "cap": 100, "pointwise": {"cuda": "pgd", "cpu": "pgd"}},
}
QUICK_PATIENCE = 10                 # the masking audit's radius check runs with the quick preset's patience
AUDIT_RANDOM_DRAWS = 8              # core.engine.evaluation.audit.RANDOM_DRAWS
APGD_STEPS = 100                    # each APGD attack's iterations (AutoAttack's standard version)
APGD_TARGETS = 9                    # APGD-T's target classes
# AutoAttack attacks only the images every attack before it left robust; a typical share after APGD-CE.
STILL_ROBUST_SHARE = 1 / 3
SQUARE_QUERIES = 5000               # Square's forward-only queries per image
FAB_UNITS_PER_TARGET = 100          # FAB-T: about one forward/backward per iteration and target

# Time outside the passes when no job of the kind has been timed yet: starting the job's process
# work, reading the data set and the model, writing the checkpoints and the report.
DEFAULT_OVERHEAD_SECONDS = 5.0

# What every worker times when it starts (worker/devices.py): the architecture, the input size and
# the batch of its forward/backward passes, by device type.
REFERENCE: dict[str, dict[str, Any]] = {
    "cpu": {"architecture": "small-cnn", "input_shape": [3, 32, 32], "batch": 32},
    "cuda": {"architecture": "preact-resnet-18", "input_shape": [3, 32, 32], "batch": 256},
}

PARAMS_EXPONENT = 0.7             # cost_ratio's

BASIS_MEASURED = "measured"        # a job of this kind finished on a worker of this class
BASIS_SCALED = "scaled"            # timed on a worker of another class, scaled by the reference costs
BASIS_REFERENCE = "reference"      # never timed: the reference architecture, scaled by the cost proxy


def kind_key(architecture: str, input_shape: Sequence[int]) -> str:
    """The key of a job's kind: its architecture at its input size, e.g. `small-cnn@1x8x8`."""
    return f"{architecture}@{'x'.join(str(int(s)) for s in input_shape)}"


def _pointwise_units(attack: str, pgd_steps: int, num_classes: int) -> float:
    """Units per image of a pointwise attack (core.engine.evaluation.pointwise)."""
    if attack == "pgd":
        return pgd_steps + FORWARD_SHARE
    targets = min(APGD_TARGETS, max(num_classes - 1, 1))
    units = APGD_STEPS + targets * APGD_STEPS * STILL_ROBUST_SHARE       # APGD-CE, then APGD-T on the rest
    if attack == "autoattack":                                           # FAB-T and Square on what is left
        units += STILL_ROBUST_SHARE * (targets * FAB_UNITS_PER_TARGET + SQUARE_QUERIES * FORWARD_SHARE)
    return units


def _ensemble_units(preset: str, steps: int) -> float:
    """Units per image of the W2 ensemble: each W-PGD attack at T + patience steps and one forward."""
    facts = PRESET_FACTS[preset]     # the cap is never below T + patience
    return float(facts["attacks"] * (steps + facts["patience"] + FORWARD_SHARE))


def _audit_units(steps: int, transfer: bool) -> float:
    """Units per image of the masking audit (core.engine.evaluation.audit): two W-PGD runs around δ,
    a short run, the random draws, one gradient; a fine-tune's transfer check adds one W-PGD."""
    units = 2 * (steps + QUICK_PATIENCE) + max(1, steps // 5) + AUDIT_RANDOM_DRAWS * FORWARD_SHARE + 1
    return units + (steps + FORWARD_SHARE if transfer else 0.0)


def finetune_passes(config: FinetuneConfig, train_available: int, test_available: int, device_type: str,
                    num_classes: int = 10) -> dict[str, float]:
    """Units of a fine-tune per phase (and "total"): `config` resolved (core.engine.defaults),
    `train_available` the training images it samples from (train_examples applied or not),
    `test_available` the data set's test split."""
    available = min(train_available, config.train_examples or train_available)
    n_val = validation_split_size(available, config)
    n_fit = max(available - n_val, 1)
    batch = min(int(config.batch_size), n_fit)
    trained = max(1, n_fit // batch) * batch                  # the last partial batch is dropped
    epochs = int(config.epochs)
    outer = 2.0 + (FORWARD_SHARE if config.attack_loss == "kl" else 0.0)   # two forwards and their backward
    dynamic = config.budget == "dynamic" and config.threat_model.is_distributional
    budget = min(config.budget_subset, n_fit) if dynamic else 0
    validation = n_val * (config.eval_wpgd_steps + config.eval_pgd_steps + 2 * FORWARD_SHARE)
    n_test = min(config.test_examples or test_available, test_available)
    pointwise = PRESET_FACTS[config.evaluation]["pointwise"]["cuda" if device_type == "cuda" else "cpu"]
    per_model = (_pointwise_units(pointwise, config.test_pgd_steps, num_classes)
                 + _ensemble_units(config.evaluation, config.test_wpgd_steps))
    phases = {
        "sensitivity": float(budget),
        "training": float(epochs * trained * (config.attack_steps + outer)),
        "validation": float((epochs + 1) * validation),          # epoch 0 is the input model
        "final_evaluation": float(n_test * (2 * per_model + _audit_units(config.test_wpgd_steps, transfer=True))),
    }
    return {**phases, "total": sum(phases.values())}


def evaluate_passes(config: EvaluateConfig, test_available: int, device_type: str,
                    num_classes: int = 10) -> dict[str, float]:
    """Units of an evaluation per phase (and "total") on `test_available` test images."""
    n = min(config.n_examples or test_available, test_available)
    device = "cuda" if device_type == "cuda" else "cpu"
    attacks = config.linf_attacks if config.linf_attacks is not None else [
        PRESET_FACTS[config.evaluation]["pointwise"][device]]
    radii = len(config.radii)
    pointwise = sum(_pointwise_units(a, config.pgd_steps, num_classes) for a in attacks)
    phases = {
        "pointwise": float(n * radii * pointwise),
        "w2_ensemble": float(n * radii * _ensemble_units(config.evaluation, config.wpgd_steps)),
        "audit": float(n * _audit_units(config.wpgd_steps, transfer=False)) if config.audit else 0.0,
    }
    return {**phases, "total": sum(phases.values())}


def cost_ratio(params: int | None, input_shape: Sequence[int], reference_params: int | None,
               reference_shape: Sequence[int]) -> float:
    """The cost proxy of an architecture never timed, relative to the reference: input pixels ×
    parameters^PARAMS_EXPONENT. The exponent is fitted to docs/runtimes.md's CPU table (the digits
    CNN against PreAct-ResNet-18: 46× the cost per pixel for 235× the parameters); a network whose
    cost per parameter differs (WideResNet-28-10 costs 12× PreAct-ResNet-18 for 3.3× the parameters)
    is several times off. Without a parameter count, the pixels alone."""
    pixels = math.prod(int(s) for s in input_shape[1:]) / max(math.prod(int(s) for s in reference_shape[1:]), 1)
    if params and reference_params:
        return pixels * float((params / reference_params) ** PARAMS_EXPONENT)
    return pixels


@dataclass(frozen=True)
class WorkerCalibration:
    """What one worker recorded (core/service/calibration.py): its device class, its reference cost
    and its kinds; `live` when its heartbeat is fresh."""

    worker: str
    live: bool
    device_class: str
    reference: dict[str, Any]                 # architecture, input_shape, batch, params, seconds_per_unit
    kinds: dict[str, dict[str, Any]]          # kind_key -> seconds_per_unit, overhead_seconds, jobs

    @property
    def seconds_per_unit(self) -> float | None:
        value = self.reference.get("seconds_per_unit")
        return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _per_worker(w: WorkerCalibration, units: float, key: str, params: int | None, input_shape: Sequence[int],
                others: Sequence[WorkerCalibration]) -> tuple[float, str] | None:
    """(seconds, basis) of the job on worker `w`, or None when it has no usable calibration."""
    kind = w.kinds.get(key)
    if kind and kind.get("seconds_per_unit"):
        overhead = float(kind.get("overhead_seconds", DEFAULT_OVERHEAD_SECONDS))
        return overhead + units * float(kind["seconds_per_unit"]), BASIS_MEASURED
    ref = w.seconds_per_unit
    if ref is None:
        return None
    ratios = [float(o.kinds[key]["seconds_per_unit"]) / o.seconds_per_unit for o in others
              if o.seconds_per_unit and key in o.kinds and o.kinds[key].get("seconds_per_unit")]
    if ratios:
        overheads = [float(o.kinds[key].get("overhead_seconds", DEFAULT_OVERHEAD_SECONDS)) for o in others
                     if key in o.kinds]
        return statistics.median(overheads) + units * ref * statistics.median(ratios), BASIS_SCALED
    ratio = cost_ratio(params, input_shape, w.reference.get("params"), w.reference.get("input_shape") or input_shape)
    return DEFAULT_OVERHEAD_SECONDS + units * ref * ratio, BASIS_REFERENCE


def device_type_of(device_class: str) -> str:
    """"cuda" for a "cuda:<name>" class, "cpu" otherwise."""
    return "cuda" if device_class.startswith("cuda") else "cpu"


def combine(passes: Callable[[str], dict[str, float]], architecture: str, input_shape: Sequence[int],
            params: int | None, workers: Iterable[WorkerCalibration]) -> dict[str, Any]:
    """The estimate of a job whose units per phase on a device type are `passes(device_type)`: per
    device class, the median over its live workers (every worker that ever recorded one when none
    is live) of the seconds on an idle worker. `devices` is empty and `reason` says why when no
    worker has calibrated yet."""
    key = kind_key(architecture, input_shape)
    every = [w for w in workers if w.seconds_per_unit is not None or w.kinds]
    classes = sorted({w.device_class for w in every})
    counted = {t: passes(t) for t in sorted({device_type_of(c) for c in classes} or {"cpu"})}
    devices: dict[str, dict[str, Any]] = {}
    for device_class in classes:
        units = counted[device_type_of(device_class)]["total"]
        mine = [w for w in every if w.device_class == device_class]
        live = [w for w in mine if w.live]
        found = [got for w in (live or mine)
                 if (got := _per_worker(w, units, key, params, input_shape, every)) is not None]
        if not found:
            continue
        seconds = [s for s, _ in found]
        bases = {b for _, b in found}
        basis = next(b for b in (BASIS_MEASURED, BASIS_SCALED, BASIS_REFERENCE) if b in bases)
        devices[device_class] = {"seconds": round(statistics.median(seconds), 1), "basis": basis,
                                 "workers_seen": len(live), "workers_calibrated": len(mine),
                                 "range_seconds": [round(min(seconds), 1), round(max(seconds), 1)]}
    reason = None if devices else (
        "no worker has recorded a calibration yet: start a worker (it times a reference model when it starts) "
        "and submit again, or watch the job's progress for its ETA")
    return {"kind": key, "passes": {t: {k: round(v) for k, v in c.items()} for t, c in counted.items()},
            "devices": devices, "reason": reason}
