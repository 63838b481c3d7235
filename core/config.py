"""Typed configurations of the two recipes: the seam between the service and the engine.

These pydantic models validate the HTTP request, document the OpenAPI schema and drive the
recipes; the module imports no torch, so the API process can use it. Every field has the
default documented in docs/concepts.md.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.settings import (
    MAX_BETA, MAX_EXAMPLES, MAX_RADIUS, MAX_SEED, MAX_STEP_RATIO, MAX_STEPS,
)

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
    def _fill_delta(self) -> "ThreatModelSpec":
        if self.delta is None:
            self.delta = DEFAULT_DELTA[self.kind]
        return self

    @property
    def is_distributional(self) -> bool:
        return self.kind.startswith("w2")

    @property
    def ground_norm(self) -> Literal["linf", "l2"]:
        return "linf" if self.kind.endswith("linf") else "l2"


class FinetuneConfig(_Strict):
    """W-TRADES fine-tuning (plain TRADES with a pointwise threat and attack_loss='kl')."""

    threat_model: ThreatModelSpec = Field(default_factory=ThreatModelSpec)
    epochs: int = Field(default=10, ge=1, le=1000)
    batch_size: int = Field(default=512, ge=1, le=65536)
    lr: float = Field(default=0.01, gt=0.0, le=10.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(default=5e-4, ge=0.0, le=1.0)
    beta: float = Field(default=6.0, ge=0.0, le=MAX_BETA, description="TRADES weight β of the KL term.")
    attack_loss: Literal["redlr", "kl", "ce", "dlr"] = "redlr"
    attack_steps: int = Field(default=10, ge=1, le=1000, description="Inner W-PGD steps K.")
    attack_step_ratio: float = Field(default=2.0, gt=0.0, le=MAX_STEP_RATIO, description="Step α = ratio·δ_B/K.")
    budget: Literal["dynamic", "fixed"] = "dynamic"
    budget_subset: int = Field(default=1024, ge=1, le=MAX_EXAMPLES, description="Images used for the initial Ῡ.")
    budget_ema_decay: float = Field(default=0.99, ge=0.0, lt=1.0)
    budget_cap: float = Field(default=3.0, ge=0.0, le=MAX_STEP_RATIO, description="δ_B is clamped to [0, cap·δ].")
    weight_perturbation: float = Field(default=0.005, ge=0.0, le=1.0, description="γ; 0 disables.")
    augment: Literal["auto", "crop_flip", "none"] = "auto"
    eval_examples: int = Field(default=1000, ge=1, le=MAX_EXAMPLES, description="Held-out images evaluated per epoch.")
    eval_wpgd_steps: int = Field(default=20, ge=1, le=MAX_STEPS)
    eval_pgd_steps: int = Field(default=10, ge=1, le=MAX_STEPS)
    train_examples: int | None = Field(default=None, ge=1, le=MAX_EXAMPLES,
                                       description="Use only the first N training images.")
    amp: Literal["auto", "bf16", "off"] = Field(default="auto", description="auto: bf16 on CUDA, float32 on CPU.")
    channels_last: bool = True
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    devices: int | None = Field(
        default=None, ge=1, le=64,
        description="Devices (GPUs) a service job trains on, one DistributedDataParallel process each; every "
                    "global batch is split between them. Default: the worker's ROBUSTIFY_DEVICES_PER_JOB (1). "
                    "The local `robustify finetune` runs on one device.")

    @model_validator(mode="after")
    def _check_devices(self) -> "FinetuneConfig":
        if self.devices and isinstance(self.batch_size, int) and self.batch_size % self.devices:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of devices {self.devices}: "
                             "each device takes an equal share of every batch")
        return self


class EvaluateConfig(_Strict):
    """Clean, W2 distributional (W-PGD) and pointwise (PGD / AutoAttack) robust accuracy."""

    threat_model: ThreatModelSpec = Field(default_factory=ThreatModelSpec)
    deltas: list[Annotated[float, Field(ge=0.0, le=MAX_RADIUS)]] | None = Field(
        default=None, max_length=100, description="Several radii for a robustness curve; default [threat_model.delta].",
    )
    n_examples: int | None = Field(default=None, ge=1, le=MAX_EXAMPLES, description="Evaluate the first N test images.")
    batch_size: int = Field(default=500, ge=1, le=65536)
    wpgd_steps: int = Field(default=50, ge=1, le=MAX_STEPS)
    wpgd_step_ratio: float = Field(default=1.875, gt=0.0, le=MAX_STEP_RATIO)
    attack_loss: Literal["redlr", "dlr", "ce"] = "redlr"
    linf_attacks: list[Literal["pgd", "autoattack"]] = Field(default_factory=lambda: ["pgd"])
    pgd_steps: int = Field(default=20, ge=1, le=MAX_STEPS)
    pgd_step_size: float = Field(default=2 / 255, gt=0.0, le=MAX_RADIUS)
    pgd_loss: Literal["ce", "dlr"] = "ce"
    autoattack_examples: int = Field(default=1000, ge=1, le=MAX_EXAMPLES)
    amp: Literal["auto", "bf16", "off"] = "auto"
    channels_last: bool = True
    seed: int = Field(default=0, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _check_deltas(self) -> "EvaluateConfig":
        if self.deltas is not None:
            if not self.deltas:
                raise ValueError("deltas must not be empty")
            if any(d < 0 for d in self.deltas):
                raise ValueError("every delta must be >= 0")
        return self

    @property
    def radii(self) -> list[float]:
        return list(self.deltas) if self.deltas else [float(self.threat_model.delta)]


# Architectures the zoo builds itself (core/zoo.py registers exactly these names). Families
# resolve the rest of a name: "robustbench:<model name>" (e.g. "robustbench:Wang2023Better_WRN-28-10"),
# "timm:<timm model name>" and "torchvision:<classification model name>".
BUILTIN_ARCHITECTURES: tuple[str, ...] = (
    "small-cnn", "preact-resnet-18", "wide-resnet-28-10", "wide-resnet-34-10",
)
ROBUSTBENCH_PREFIX = "robustbench:"
FAMILY_PREFIXES: tuple[str, ...] = (ROBUSTBENCH_PREFIX, "timm:", "torchvision:")


def is_known_architecture_name(name: str) -> bool:
    """Cheap, torch-free check the API runs before storing an upload (the worker checks the
    family's own names and suggests close ones)."""
    return name in BUILTIN_ARCHITECTURES or any(
        name.startswith(prefix) and len(name) > len(prefix) for prefix in FAMILY_PREFIXES)
