"""Typed configurations of the two recipes: the seam between the service and the engine.

These pydantic models validate the HTTP request, document the OpenAPI schema and drive the
recipes; the module imports no torch, so the API process can use it. Defaults follow the
algorithm's specification (docs/concepts.md); `epochs`, `batch_size` and `lr` default to "auto"
and are resolved from the training-set size by core.engine.defaults.
"""
from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.limits import MAX_BETA, MAX_EXAMPLES, MAX_RADIUS, MAX_SEED, MAX_STEP_RATIO, MAX_STEPS

ThreatKind = Literal["w2-linf", "w2-l2", "linf", "l2"]

DEFAULT_DELTA: dict[str, float] = {"w2-linf": 8 / 255, "linf": 8 / 255, "w2-l2": 0.5, "l2": 0.5}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # JSON has no NaN or Infinity


class ThreatModelSpec(_Strict):
    """A threat model (p, r, δ): W2 balls with l∞ or l2 ground cost, or pointwise balls."""

    kind: ThreatKind = "w2-linf"
    delta: float | None = Field(
        default=None, ge=0.0, le=MAX_RADIUS,
        description="Radius δ; omitted → 8/255 for l∞ ground cost, 0.5 for l2.",
    )

    @model_validator(mode="after")
    def _fill_delta(self) -> ThreatModelSpec:
        if self.delta is None:
            self.delta = DEFAULT_DELTA[self.kind]
        return self

    @property
    def radius(self) -> float:
        """δ as a number: validation has filled in the kind's default when the request left it out."""
        return DEFAULT_DELTA[self.kind] if self.delta is None else float(self.delta)

    @property
    def is_distributional(self) -> bool:
        return self.kind.startswith("w2")

    @property
    def ground_norm(self) -> Literal["linf", "l2"]:
        return "linf" if self.kind.endswith("linf") else "l2"


AUTO: Literal["auto"] = "auto"
MEMORY_ATTACK_STEPS = 1   # attack_steps under attack_schedule "memory" when the request leaves it out
ALLOCATE_ATTACK_STEPS = 1  # ... and under attack_schedule "allocate"
Auto = Literal["auto"]
# What the before/after (and an evaluation's) W2 numbers run: core.engine.evaluation.ensemble's table.
EvaluationPreset = Literal["standard", "quick"]
SelectionMetric = Literal["w2_robust_accuracy", "linf_robust_accuracy", "l2_robust_accuracy",
                          "w2_robust_to_clean_ratio", "clean_accuracy"]


# The 15 common corruptions of Hendrycks & Dietterich (ImageNet-C, CIFAR-10-C) in their order, by
# family; core.engine.evaluation.corruptions applies them (the imagecorruptions package).
CorruptionType = Literal["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                         "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                         "elastic_transform", "pixelate", "jpeg_compression"]
CORRUPTION_TYPES: tuple[CorruptionType, ...] = get_args(CorruptionType)
CORRUPTION_FAMILIES: dict[str, tuple[CorruptionType, ...]] = {
    "noise": CORRUPTION_TYPES[0:3], "blur": CORRUPTION_TYPES[3:7], "weather": CORRUPTION_TYPES[7:11],
    "digital": CORRUPTION_TYPES[11:15],
}
CORRUPTION_SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


def _corruption_types(value: object) -> object:
    """Type names, family names (noise, blur, weather, digital) or "all" → the type names, each
    once, in the standard order; an unknown name is one error naming it and its closest names."""
    if not isinstance(value, (list, tuple)):
        return value                     # pydantic says what is wrong with it
    chosen: set[str] = set()
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"a corruption type is a name, got {item!r}")
        name = item.strip().lower().replace("-", "_").replace(" ", "_")
        if name == "all":
            chosen.update(CORRUPTION_TYPES)
        elif name in CORRUPTION_FAMILIES:
            chosen.update(CORRUPTION_FAMILIES[name])
        elif name in CORRUPTION_TYPES:
            chosen.add(name)
        else:
            close = difflib.get_close_matches(name, [*CORRUPTION_TYPES, *CORRUPTION_FAMILIES], n=2)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise ValueError(f"unknown corruption type {item!r}{hint}; the types are {', '.join(CORRUPTION_TYPES)}, "
                             f"or a family ({', '.join(CORRUPTION_FAMILIES)}) or 'all'")
    return [t for t in CORRUPTION_TYPES if t in chosen]


def _corruption_severities(value: object) -> object:
    if not isinstance(value, (list, tuple)):
        return value
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int) or s not in CORRUPTION_SEVERITIES:
            raise ValueError(f"corruption severities are whole numbers from 1 to 5, got {s!r}")
    return sorted(set(value))


class CorruptionSpec(_Strict):
    """Which common corruptions to measure: every type at every severity unless narrowed."""

    types: list[CorruptionType] = Field(
        default_factory=lambda: list(CORRUPTION_TYPES), min_length=1,
        description="Corruption types, or families (noise, blur, weather, digital) or 'all'; default all 15.")
    severities: list[Annotated[int, Field(ge=1, le=5)]] = Field(
        default_factory=lambda: list(CORRUPTION_SEVERITIES), min_length=1,
        description="Severities from 1 (mild) to 5 (strong); default all five.")
    n_examples: int | None = Field(
        default=None, ge=1, le=MAX_EXAMPLES,
        description="Corrupt at most this many of the test sample's images (a seeded stratified sample of it); "
                    "null: all of them.")

    @field_validator("types", mode="before")
    @classmethod
    def _known_types(cls, value: object) -> object:
        return _corruption_types(value)

    @field_validator("severities", mode="before")
    @classmethod
    def _known_severities(cls, value: object) -> object:
        return _corruption_severities(value)

    @property
    def cells(self) -> list[tuple[str, int]]:
        """Every (type, severity) asked for, in the standard order."""
        return [(t, s) for t in self.types for s in self.severities]


CORRUPTIONS_DESCRIPTION = (
    "Accuracy under the 15 common corruptions of Hendrycks & Dietterich (noise, blur, weather, digital) at "
    "severities 1-5, applied to the test images at their own size and channels (docs/corruptions.md). "
    "true: every type and severity; a list of types or families; or {types, severities, "
    "n_examples}; null or false: none (the default: it adds about 75 corrupted copies of the sample).")


def _corruptions_field(value: object) -> object:
    """true → every type and severity; false/null → none; a list of names → those types."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, (list, tuple)):
        value = {"types": value}
    if isinstance(value, CorruptionSpec):
        return value
    if not isinstance(value, dict):
        raise ValueError("corruptions must be true or false, a list of corruption types, or an object "
                         f"{{types, severities, n_examples}}; got {value!r}")
    try:                                 # one error naming the problem, not one per member of the union
        return CorruptionSpec.model_validate(value)
    except ValidationError as exc:
        raise ValueError("; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'corruptions'}: "
                                   f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())) from None


# What the field accepts (the OpenAPI schema says so); validated, it is a CorruptionSpec or None.
Corruptions = CorruptionSpec | list[CorruptionType] | bool | None


def corruption_spec(value: Any) -> CorruptionSpec | None:
    """The validated `corruptions` field as a CorruptionSpec (None: not asked for)."""
    return value if isinstance(value, CorruptionSpec) or value is None else CorruptionSpec.model_validate(
        _corruptions_field(value))


class _MeasuresCorruptions(_Strict):
    """A recipe config with a `corruptions` field (each declares it, with its own description)."""

    @field_validator("corruptions", mode="before", check_fields=False)
    @classmethod
    def _corruptions(cls, value: object) -> object:
        return _corruptions_field(value)

    @property
    def corruption_spec(self) -> CorruptionSpec | None:
        return corruption_spec(getattr(self, "corruptions", None))


# Bounds of the numeric values of the fields that also take "auto" (lr: strictly above its low end).
_AUTO_FIELD_RANGES: dict[str, tuple[float, float]] = {"epochs": (1, 1000), "batch_size": (1, 65536), "lr": (0.0, 10.0)}


def _auto_or_number(name: str, value: object) -> object:
    """A field that takes a number in its range or "auto", checked in full so that a bad value is
    one error naming the field (the int | "auto" union would report one error per member)."""
    if value == AUTO:
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f'{name} must be a number or "auto", got {value!r}') from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f'{name} must be a number or "auto"')
    low, high = _AUTO_FIELD_RANGES[name]
    if name != "lr":
        if value != int(value):
            raise ValueError(f'{name} must be a whole number or "auto", got {value}')
        value = int(value)
    if not (value > low if name == "lr" else value >= low) or value > high:
        bound = f"> {low}" if name == "lr" else f">= {low}"
        raise ValueError(f'{name} must be {bound} and <= {high}, or "auto"; got {value}')
    return value


class SelectionRule(_Strict):
    """Which checkpoint is "best": epoch 0 (the model that went in) is always a candidate.

    Among the epochs whose validation clean accuracy is at most `max_clean_drop` below the
    input's, the one with the highest validation `metric` at the job's δ wins; a tie goes to
    the earlier epoch, so a fine-tune that does not beat the input hands the input back. Whether
    the winner is an improvement is decided on the test split (core.engine.recipes.verdict).
    """

    metric: SelectionMetric | Auto = Field(
        default=AUTO, description="auto: w2_robust_accuracy for W2 threats, the pointwise robust accuracy "
                                  "(linf_/l2_robust_accuracy) for linf/l2 threats.")
    max_clean_drop: float | None = Field(
        default=0.10, ge=0.0, le=1.0,
        description="Largest allowed drop of clean accuracy from the input's: on the validation split it rules an "
                    "epoch out; on the test split a larger drop qualifies the verdict (never an unqualified "
                    "'improved'); null: no limit.")


class FinetuneConfig(_MeasuresCorruptions):
    """W-TRADES fine-tuning (plain TRADES with a pointwise threat and attack_loss='kl')."""

    threat_model: ThreatModelSpec = Field(default_factory=ThreatModelSpec)
    epochs: Annotated[int, Field(ge=1, le=1000)] | Auto = Field(
        default=AUTO, description="auto: about 500 optimizer steps, between 2 and 10 epochs (core.engine.defaults).")
    batch_size: Annotated[int, Field(ge=1, le=65536)] | Auto = Field(
        default=AUTO, description="auto: a power of two in [16, 512] near training images / 64 (core.engine.defaults).")
    lr: Annotated[float, Field(gt=0.0, le=10.0)] | Auto = Field(
        default=AUTO, description="auto: 0.0025, safe for β = 6 from a non-robust start (core.engine.defaults).")
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(default=5e-4, ge=0.0, le=1.0)
    beta: float = Field(default=6.0, ge=0.0, le=MAX_BETA, description="TRADES weight β of the KL term.")
    attack_loss: Literal["redlr", "kl", "ce", "dlr"] = "redlr"
    attack_steps: int = Field(default=10, ge=1, le=1000,
                              description="Inner W-PGD steps K (under attack_schedule 'memory' the default is 1).")
    attack_schedule: Literal["standard", "memory", "allocate"] = Field(
        default="standard",
        description="standard: every batch's attack starts at the clean images. memory (fast W-TRADES): it "
                    "starts at each training image's perturbation from its previous epoch, re-projected into "
                    "the batch's budget δ_B, and takes attack_steps steps (default 1). allocate (fast W-TRADES, "
                    "W2 threats): the first step gives the batch's budget to the images nearest the decision "
                    "boundary, each moved attack_overshoot times its first-order distance, cheapest first; "
                    "attack_steps steps in all (default 1).")
    attack_step_ratio: float = Field(default=2.0, gt=0.0, le=MAX_STEP_RATIO, description="Step α = ratio·δ_B/K.")
    attack_overshoot: float = Field(default=1.5, ge=1.0, le=MAX_STEP_RATIO,
                                    description="attack_schedule 'allocate': γ, the multiple of each point's "
                                                "first-order distance to the decision boundary it is moved.")
    budget: Literal["dynamic", "fixed"] = "dynamic"
    budget_subset: int = Field(default=1024, ge=1, le=MAX_EXAMPLES,
                               description="Training images (a seeded stratified sample) that give the initial Ῡ.")
    budget_ema_decay: float = Field(default=0.8, ge=0.0, lt=1.0,
                                    description="After each batch Ῡ ← decay·Ῡ + (1 − decay)·min(Υ_B, cap·Ῡ).")
    budget_cap: float = Field(default=3.0, ge=0.0, le=MAX_STEP_RATIO, description="δ_B is clamped to [0, cap·δ].")
    weight_perturbation: float = Field(default=0.005, ge=0.0, le=1.0, description="γ; 0 disables.")
    augment: Literal["auto", "crop_flip", "none"] = "auto"
    selection: SelectionRule = Field(default_factory=SelectionRule)
    validation_fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0,
        description="Share of the training images held out (a seeded stratified sample) to select the checkpoint.")
    validation_examples: int = Field(default=1000, ge=1, le=MAX_EXAMPLES,
                                     description="At most this many validation images.")
    test_examples: int | None = Field(
        default=None, ge=1, le=MAX_EXAMPLES,
        description="Test images for the reported before/after numbers, a seeded stratified sample of the test "
                    "split (every class in proportion); null: all of them.")
    evaluation: EvaluationPreset = Field(
        default="standard",
        description="The attack ensemble of the before/after test numbers (core.engine.evaluation.ensemble): "
                    "standard runs every attack to convergence; quick is cheaper, for smoke tests. The "
                    "per-epoch validation keeps its own cheaper eval_* attacks.")
    corruptions: Corruptions = Field(
        default=None, description=CORRUPTIONS_DESCRIPTION + " A fine-tune measures them on the input model and the "
                                                            "returned checkpoint, with the corruption error (mCE) "
                                                            "of the checkpoint relative to the input.")
    eval_wpgd_steps: int = Field(default=20, ge=1, le=MAX_STEPS, description="W-PGD steps of the per-epoch validation.")
    eval_pgd_steps: int = Field(default=10, ge=1, le=MAX_STEPS, description="PGD steps of the per-epoch validation.")
    test_wpgd_steps: int = Field(
        default=50, ge=1, le=MAX_STEPS,
        description="The reported test numbers' W-PGD attacks: their nominal steps T (step 1.875·δ/T, at least T "
                    "steps, then on to convergence up to the evaluation preset's cap).")
    test_pgd_steps: int = Field(default=20, ge=1, le=MAX_STEPS,
                                description="PGD steps of the reported test numbers, where the preset's pointwise "
                                            "attack is PGD (quick).")
    train_examples: int | None = Field(
        default=None, ge=2, le=MAX_EXAMPLES,
        description="Use only N training images, a seeded stratified sample (every class in proportion, each "
                    "class at least once when N is at least the number of classes); null: all of them. At "
                    "least 2: one is held out to select the checkpoint, one is trained on.")
    amp: Literal["auto", "bf16", "off"] = Field(
        default="auto", description="The training step: auto is bf16 on CUDA, float32 on CPU.")
    eval_amp: Literal["off", "bf16"] = Field(
        default="off", description="Validation and test attacks: float32 unless bf16 is asked for.")
    channels_last: bool = True
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    devices: int | None = Field(
        default=None, ge=1, le=64,
        description="Devices (GPUs) a service job trains on, one DistributedDataParallel process each; every "
                    "global batch is split between them. Default: the worker's ROBUSTIFY_DEVICES_PER_JOB (1). "
                    "The local `robustify finetune` runs on one device.")

    @model_validator(mode="after")
    def _check_attack_schedule(self) -> FinetuneConfig:
        if self.attack_schedule == "standard":
            return self
        if "attack_steps" not in self.model_fields_set:
            self.attack_steps = MEMORY_ATTACK_STEPS if self.attack_schedule == "memory" else ALLOCATE_ATTACK_STEPS
        if self.attack_schedule == "allocate":
            if not self.threat_model.is_distributional:
                raise ValueError("attack_schedule 'allocate' shares a Wasserstein budget between the batch's images, "
                                 f"so it needs a w2-linf or w2-l2 threat_model, not {self.threat_model.kind!r}")
            if self.attack_loss not in ("redlr", "dlr"):
                raise ValueError("attack_schedule 'allocate' measures each image's distance to the decision boundary "
                                 "with a margin loss: attack_loss must be 'redlr' or 'dlr', not "
                                 f"{self.attack_loss!r}")
            return self
        if self.epochs != AUTO and int(self.epochs) < 2:
            raise ValueError("attack_schedule 'memory' starts each epoch's attack from the image's perturbation of "
                             "the epoch before, so it needs epochs >= 2 (or \"auto\"); with one epoch use "
                             "attack_schedule 'standard'")
        return self

    @model_validator(mode="after")
    def _check_devices(self) -> FinetuneConfig:
        if self.devices and isinstance(self.batch_size, int) and self.batch_size % self.devices:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of devices {self.devices}: "
                             "each device takes an equal share of every batch")
        return self

    @field_validator("epochs", "batch_size", "lr", mode="before")
    @classmethod
    def _auto_or_in_range(cls, value: object, info: object) -> object:
        return _auto_or_number(getattr(info, "field_name", ""), value)

    @model_validator(mode="after")
    def _resolve_selection_metric(self) -> FinetuneConfig:
        ground = self.threat_model.ground_norm
        if self.selection.metric == AUTO:
            self.selection.metric = ("w2_robust_accuracy" if self.threat_model.is_distributional
                                     else "linf_robust_accuracy" if ground == "linf" else "l2_robust_accuracy")
        other = "l2" if ground == "linf" else "linf"
        if self.selection.metric.startswith(other + "_"):
            raise ValueError(f"selection.metric {self.selection.metric} is not measured for a "
                             f"{self.threat_model.kind} threat; use w2_robust_accuracy or {ground}_robust_accuracy")
        return self

    @property
    def unresolved(self) -> list[str]:
        """The fields still "auto" (core.engine.defaults.resolve_finetune fills them in)."""
        return [name for name in ("epochs", "batch_size", "lr") if getattr(self, name) == AUTO]


EVALUATION_DESCRIPTION = (
    "The attack preset of the robust accuracies (docs/concepts.md, 'The evaluation protocol'). standard: W2 is "
    "the minimum over W-PGD with ReDLR, W-PGD with cross-entropy and W-PGD from a random start in the ball, each "
    "run until its accuracy stops falling (patience 25 steps, cap 500); the pointwise number is AutoAttack's "
    "standard version on a GPU, APGD-CE + APGD-T on a CPU. quick: ReDLR and cross-entropy W-PGD (patience 10, "
    "cap 100) and PGD, for per-epoch validation and smoke tests.")


class EvaluateConfig(_MeasuresCorruptions):
    """Clean, W2 distributional (an ensemble of W-PGD attacks) and pointwise (AutoAttack / APGD / PGD)
    robust accuracy, each with n and a 95 % interval, a masking audit and per-class numbers."""

    threat_model: ThreatModelSpec = Field(default_factory=ThreatModelSpec)
    deltas: list[Annotated[float, Field(ge=0.0, le=MAX_RADIUS)]] | None = Field(
        default=None, max_length=100, description="Several radii for a robustness curve; default [threat_model.delta].",
    )
    evaluation: EvaluationPreset = Field(default="standard", description=EVALUATION_DESCRIPTION)
    n_examples: int | None = Field(
        default=None, ge=1, le=MAX_EXAMPLES,
        description="Evaluate a seeded (seed), stratified random sample of N test images; null: all of them.")
    batch_size: Annotated[int, Field(ge=1, le=65536)] | Auto = Field(
        default=AUTO, description="Images per forward/backward pass; changes speed only, never a result. auto: "
                                  "resolved where the job runs: 1,024 CIFAR-sized images on a GPU, a "
                                  "cache-sized 32-256 on a CPU (core.engine.defaults.auto_eval_batch_size).")
    wpgd_steps: int = Field(
        default=50, ge=1, le=MAX_STEPS,
        description="Nominal W-PGD steps T: each attack of the ensemble steps by wpgd_step_ratio·δ/T, runs at least "
                    "T steps, then until it stops improving (the preset's patience and step cap).")
    wpgd_step_ratio: float = Field(default=1.875, gt=0.0, le=MAX_STEP_RATIO)
    attack_loss: Literal["redlr", "dlr", "ce"] = Field(
        default="redlr", description="Loss of the ensemble's first W-PGD attack and of its random-start attack "
                                     "(the second attack uses cross-entropy, or ReDLR when this is ce).")
    linf_attacks: list[Literal["pgd", "apgd", "autoattack"]] | None = Field(
        default=None,
        description="Pointwise attacks at every radius (a W2 ensemble member each); null: the preset's "
                    "(standard: autoattack on a GPU, apgd = APGD-CE + APGD-T on a CPU; quick: pgd); [] for none.")
    pgd_steps: int = Field(default=20, ge=1, le=MAX_STEPS)
    pgd_step_ratio: float = Field(
        default=0.25, gt=0.0, le=MAX_STEP_RATIO,
        description="l∞ PGD step as a fraction of the radius attacked (2/255 at 8/255).")
    pgd_loss: Literal["ce", "dlr"] = "ce"
    autoattack_examples: int = Field(
        default=1000, ge=1, le=MAX_EXAMPLES,
        description="No longer used: the pointwise attacks run on the whole sample (n_examples), so that W2 <= "
                    "pointwise holds image for image; accepted so that older requests validate.")
    audit: bool = Field(default=True, description="Run the masking audit at the headline radius.")
    corruptions: Corruptions = Field(default=None, description=CORRUPTIONS_DESCRIPTION)
    amp: Literal["off", "bf16"] = Field(
        default="off", description="Robust accuracy is measured in float32 unless bf16 is asked for.")
    channels_last: bool = True
    seed: int = Field(default=0, ge=0, le=MAX_SEED)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_auto_or_in_range(cls, value: object) -> object:
        return _auto_or_number("batch_size", value)

    @model_validator(mode="after")
    def _check_deltas(self) -> EvaluateConfig:
        if self.deltas is not None:
            if not self.deltas:
                raise ValueError("deltas must not be empty")
            if any(d < 0 for d in self.deltas):
                raise ValueError("every delta must be >= 0")
        return self

    @property
    def radii(self) -> list[float]:
        return list(self.deltas) if self.deltas else [self.threat_model.radius]

    @property
    def headline_delta(self) -> tuple[float, str]:
        """The radius the summary reports: the threat model's δ when it is among the radii, else
        the largest radius; with where it came from ("threat_model" or "largest_radius")."""
        delta = self.threat_model.radius
        if any(abs(r - delta) <= 1e-12 * max(1.0, delta) for r in self.radii):
            return delta, "threat_model"
        return max(self.radii), "largest_radius"

