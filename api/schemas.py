"""Request bodies and the JSON objects the API returns.

The job's `config` and `threat_model` are the engine's own pydantic models
(core.config.FinetuneConfig / EvaluateConfig / ThreatModelSpec), so defaults are filled in
and bad values are 422s naming the field.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import models_json_schema

from core.config import EvaluateConfig, FinetuneConfig, ThreatModelSpec
from core.db import Artifact, Dataset, Job, JobEvent, Model, as_utc

BUILTIN_DATASETS: dict[str, list[int]] = {
    # name -> the input shape [C, H, W] of its images
    "digits": [1, 8, 8],
    "fashion-mnist": [1, 28, 28],
    "cifar10": [3, 32, 32],
    "cifar100": [3, 32, 32],
}
ROBUSTBENCH_DATASETS = ("cifar10", "cifar100", "imagenet")
ROBUSTBENCH_THREATS = ("Linf", "L2", "corruptions")


_COMPONENTS = "#/components/schemas/"
RECIPE_CONFIGS: tuple[type[BaseModel], ...] = (FinetuneConfig, EvaluateConfig)


def add_recipe_schemas(openapi: dict[str, Any]) -> dict[str, Any]:
    """Put the recipe configs (and the models they use) into the OpenAPI components, which
    JobCreate.config refers to; FastAPI only adds models that a route declares itself."""
    _, defs = models_json_schema([(m, "validation") for m in RECIPE_CONFIGS],
                                 ref_template=_COMPONENTS + "{model}")
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in defs.get("$defs", {}).items():
        components.setdefault(name, schema)
    return openapi


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ---------------------------------------------------------------------------- requests
class RobustBenchRef(_Body):
    name: str = Field(min_length=1, max_length=180, pattern=r"^[A-Za-z0-9_.\-]+$",
                      examples=["Wang2023Better_WRN-28-10"])
    dataset: Literal["cifar10", "cifar100", "imagenet"] = "cifar10"
    threat_model: Literal["Linf", "L2", "corruptions"] = "Linf"


class RobustBenchModelCreate(RobustBenchRef):
    """POST /v1/models with a JSON body registers a RobustBench model."""

    source: Literal["robustbench"]
    metadata: dict[str, Any] | None = None


class ModelUploadForm(_Body):
    """The text fields of the multipart upload (the weights come as the `file` part)."""

    architecture: str = Field(min_length=1, max_length=200)
    num_classes: int = Field(ge=2, le=100000)
    dataset: str = Field(min_length=1, max_length=100)
    name: str | None = Field(default=None, max_length=200)
    metadata: dict[str, Any] | None = None
    input_shape: list[int] | None = None

    @field_validator("metadata", mode="before")
    @classmethod
    def _json_metadata(cls, value: Any) -> Any:
        import json

        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"metadata must be a JSON object ({exc})") from None
        if value is not None and not isinstance(value, dict):
            raise ValueError("metadata must be a JSON object")
        return value

    @field_validator("input_shape", mode="before")
    @classmethod
    def _shape(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
            except ValueError:
                raise ValueError('input_shape must look like "1,8,8" (channels, height, width)') from None
        if value is not None and (len(value) != 3 or any(int(v) < 1 or int(v) > 4096 for v in value)):
            raise ValueError("input_shape must be three positive sizes: channels, height, width")
        return value


class InlineModelRef(_Body):
    robustbench: RobustBenchRef


class JobCreate(_Body):
    type: Literal["finetune", "evaluate"]
    model_id: str | None = Field(default=None, max_length=40)
    model: InlineModelRef | None = None
    dataset: str = Field(min_length=1, max_length=100,
                         description="A built-in data set (digits, fashion-mnist, cifar10, cifar100) or a dataset id.")
    threat_model: ThreatModelSpec | None = None
    # A plain object here: the route validates it with the model that `type` names, so a bad
    # value is a 422 naming body.config.<field>. The schema below documents both recipes.
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Recipe fields, each optional (defaults shown): FinetuneConfig when type is finetune, "
                    "EvaluateConfig when type is evaluate.",
        json_schema_extra={"anyOf": [{"$ref": f"{_COMPONENTS}{m.__name__}"} for m in RECIPE_CONFIGS]},
    )
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_model(self) -> "JobCreate":
        if (self.model_id is None) == (self.model is None):
            raise ValueError("give exactly one of model_id or model (an inline {\"robustbench\": {...}} reference)")
        return self


# ---------------------------------------------------------------------------- responses
def ts(value: datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat().replace("+00:00", "Z") if value else None


def model_object(m: Model, weights: Artifact | None) -> dict[str, Any]:
    return {
        "id": m.id, "object": "model", "name": m.name, "source": m.source,
        "architecture": m.architecture, "num_classes": m.num_classes, "dataset": m.dataset,
        "input_shape": m.input_shape, "threat_model": m.threat_model, "status": m.status,
        "error": m.error, "metadata": m.meta,
        "sha256": weights.sha256 if weights else None, "size": weights.size if weights else None,
        "created_at": ts(m.created_at), "updated_at": ts(m.updated_at),
        "urls": {"self": f"/v1/models/{m.id}",
                 "content": f"/v1/models/{m.id}/content" if weights else None},
    }


def dataset_object(d: Dataset, artifact: Artifact | None) -> dict[str, Any]:
    return {
        "id": d.id, "object": "dataset", "name": d.name, "status": d.status,
        "num_examples": d.num_examples, "num_classes": d.num_classes, "image_shape": d.image_shape,
        "sha256": artifact.sha256 if artifact else None, "size": artifact.size if artifact else None,
        "metadata": d.meta, "created_at": ts(d.created_at), "urls": {"self": f"/v1/datasets/{d.id}"},
    }


_PROGRESS_KEYS = ("fraction", "phase", "epoch", "total_epochs", "step", "total_steps", "eta_seconds")
_METRIC_KEYS = ("clean_accuracy", "w2_robust_accuracy", "linf_robust_accuracy", "train_loss", "delta")


def job_object(j: Job) -> dict[str, Any]:
    progress: dict[str, Any] = dict.fromkeys(_PROGRESS_KEYS)
    progress["fraction"] = 1.0 if j.status == "succeeded" else 0.0
    progress.update(j.progress or {})
    metrics: dict[str, Any] = dict.fromkeys(_METRIC_KEYS)
    metrics.update(j.latest_metrics or {})
    base = f"/v1/jobs/{j.id}"
    return {
        "id": j.id, "object": "job", "type": j.type, "status": j.status, "model_id": j.model_id,
        "dataset": j.dataset, "threat_model": j.threat_model, "config": j.config, "seed": j.seed,
        "metadata": j.meta, "created_at": ts(j.created_at), "started_at": ts(j.started_at),
        "finished_at": ts(j.finished_at), "progress": progress, "latest_metrics": metrics,
        "result": j.result, "error": j.error, "attempt": j.attempt, "max_attempts": j.max_attempts,
        "cancel_requested_at": ts(j.cancel_requested_at),
        "urls": {"self": base, "cancel": f"{base}/cancel", "events": f"{base}/events",
                 "checkpoint": f"{base}/checkpoint", "report": f"{base}/report"},
    }


def event_object(e: JobEvent) -> dict[str, Any]:
    return {
        "id": e.id, "object": "event", "job_id": e.job_id, "type": e.type, "level": e.level,
        "message": e.message, "data": e.data, "created_at": ts(e.created_at),
    }


def checkpoint_object(a: Artifact) -> dict[str, Any]:
    return {
        "id": a.id, "object": "checkpoint", "job_id": a.job_id, "epoch": a.epoch,
        "is_best": bool(a.is_best), "metrics": a.data, "sha256": a.sha256, "size": a.size,
        "filename": a.filename, "created_at": ts(a.created_at),
        "urls": {"content": f"/v1/jobs/{a.job_id}/checkpoints/{a.id}/content"},
    }


def page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "has_more": has_more,
            "last_id": items[-1]["id"] if items else None}
