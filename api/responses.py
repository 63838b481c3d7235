"""The JSON objects the API returns, as pydantic models: the routes' `response_model`s, and so
the typed schemas of /openapi.json (Job, Model, Dataset, Checkpoint, Event, WebhookEndpoint,
WebhookDelivery, the list envelopes, health and architectures).

They describe what api/schemas.py's *_object() functions build, field for field: the routes
still build plain dicts, FastAPI checks them against these models and writes the same JSON. A
top-level object forbids unknown fields, so a field added to a builder but not here fails the
tests (a 500 there) instead of vanishing from the answer; the open-ended parts (config, result,
metrics, metadata, progress) stay objects that accept any key.
"""
from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from core.states import JobStatus, JobType

# An ISO 8601 UTC time as the API writes it ("2026-01-31T12:00:00.123456Z"); kept a string so
# that the answer is byte for byte what the route built.
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
# A JSON number written as it came (an int stays an int, a float a float).
Number = int | float


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=(), populate_by_name=True)


class ErrorInfo(_Open):
    """Why a job failed or a model was rejected: a stable `code` and a `message` saying what to do."""

    code: str
    message: str


# ------------------------------------------------------------------------------- jobs
class Progress(_Open):
    fraction: Number | None = Field(description="0 to 1")
    phase: str | None = Field(description="e.g. baseline, train, validate, test")
    epoch: int | None
    total_epochs: int | None
    step: int | None
    total_steps: int | None
    eta_seconds: Number | None


class LatestMetrics(_Open):
    """The most recent numbers the worker reported (more keys may appear)."""

    clean_accuracy: Number | None
    w2_robust_accuracy: Number | None
    linf_robust_accuracy: Number | None
    train_loss: Number | None
    delta: Number | None


class JobWebhookInfo(_Closed):
    endpoint_id: str
    events: list[str] | None = Field(description="event types sent; null: the endpoint's")


class JobUrls(_Closed):
    self_: str = Field(alias="self")
    cancel: str
    events: str
    checkpoint: str
    report: str


class Job(_Closed):
    """A fine-tuning or evaluation job."""

    id: str
    object: Literal["job"]
    type: JobType
    status: JobStatus
    model_id: str | None
    dataset: str
    threat_model: dict[str, Any] | None = Field(description="the ThreatModelSpec the job runs with: kind and delta")
    config: dict[str, Any] = Field(description="the recipe's fields as the job runs them (FinetuneConfig or "
                                               "EvaluateConfig, its auto values resolved)")
    seed: int | None
    metadata: dict[str, Any] | None
    created_at: Timestamp | None
    started_at: Timestamp | None
    finished_at: Timestamp | None
    progress: Progress
    latest_metrics: LatestMetrics
    result: dict[str, Any] | None = Field(description="a finished job's summary: before/after numbers of a "
                                                      "fine-tune, the headline numbers of an evaluation")
    error: ErrorInfo | None
    attempt: int
    max_attempts: int | None
    cancel_requested_at: Timestamp | None
    webhook: JobWebhookInfo | None
    urls: JobUrls


class Event(_Closed):
    """One entry of a job's event log (also the `data` of a Server-Sent Event)."""

    id: int
    object: Literal["event"]
    job_id: str
    type: str = Field(description="status, progress, metrics, checkpoint, model, warning, log, ...")
    level: str
    message: str | None
    data: dict[str, Any] | None
    created_at: Timestamp | None


class CheckpointUrls(_Closed):
    content: str


class Checkpoint(_Closed):
    """A fine-tune's weights after one epoch (safetensors)."""

    id: str
    object: Literal["checkpoint"]
    job_id: str | None
    epoch: int | None
    is_best: bool
    metrics: dict[str, Any] | None
    sha256: str
    size: int
    filename: str
    created_at: Timestamp | None
    urls: CheckpointUrls


class Report(_Open):
    """The report of a finished job (report.json): a fine-tune's before/after numbers, history and
    provenance, or an evaluation's curves; see docs/concepts.md for every field."""

    type: JobType


# ------------------------------------------------------------------------------- models, datasets
class ModelUrls(_Closed):
    self_: str = Field(alias="self")
    content: str | None = Field(description="the weights; null when none are stored (RobustBench, Hub)")


class Model(_Closed):
    """A registered model: uploaded weights, a RobustBench or Hub model, or a fine-tune's result."""

    id: str
    object: Literal["model"]
    name: str | None
    source: Literal["upload", "robustbench", "hf-hub", "job"]
    architecture: str
    num_classes: int
    dataset: str
    input_size: list[int] | None = Field(description="[C, H, W]")
    input_shape: list[int] | None = Field(description="the former name of input_size")
    input_mean: list[Number] | None
    input_std: list[Number] | None
    threat_model: str | None = Field(description="RobustBench's threat model of a zoo model")
    status: Literal["validating", "ready", "rejected"]
    parent_model_id: str | None
    source_job_id: str | None
    error: ErrorInfo | None
    metadata: dict[str, Any] | None
    sha256: str | None
    size: int | None
    created_at: Timestamp | None
    updated_at: Timestamp | None
    urls: ModelUrls


class DatasetUrls(_Closed):
    self_: str = Field(alias="self")


class Dataset(_Closed):
    """An uploaded data set, stored as the project's .npz."""

    id: str
    object: Literal["dataset"]
    name: str
    status: str
    num_examples: int
    num_classes: int
    image_shape: list[int] = Field(description="[C, H, W]")
    class_names: list[str] | None
    splits: dict[str, int] | None = Field(description="examples per split of an image-folder upload")
    sha256: str | None
    size: int | None
    metadata: dict[str, Any] | None
    created_at: Timestamp | None
    urls: DatasetUrls


class Deleted(_Closed):
    id: str
    object: str
    deleted: Literal[True]


# ------------------------------------------------------------------------------- webhooks
class WebhookEndpoint(_Closed):
    id: str
    object: Literal["webhook_endpoint"]
    url: str
    secret: str = Field(description="whsec_…: verifies the signatures (Standard Webhooks)")
    events: list[str] | None = Field(description="event types sent; null: every type")
    default: bool
    description: str | None
    created_at: Timestamp | None


class WebhookAttempt(_Open):
    at: Timestamp | None = None
    status_code: int | None = None
    error: str | None = None
    duration_ms: Number | None = None


class WebhookDelivery(_Closed):
    id: str = Field(description="the webhook-id header, the same on every retry")
    object: Literal["webhook_delivery"]
    job_id: str
    endpoint_id: str
    event_type: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: list[WebhookAttempt]
    next_attempt_at: Timestamp | None
    delivered_at: Timestamp | None
    created_at: Timestamp | None


# ------------------------------------------------------------------------------- architectures
class Architecture(_Closed):
    """A name to give as `architecture` (only the fields that apply are present)."""

    id: str = Field(examples=["small-cnn", "timm:resnet18"])
    object: Literal["architecture"]
    family: str
    description: str | None = None
    variants: list[dict[str, Any]] | None = Field(default=None, description="RobustBench: its data sets and "
                                                                            "threat models")


class ArchitectureFamily(_Closed):
    id: str
    object: Literal["architecture_family"]
    family: str
    pattern: str
    description: str
    search: str


# ------------------------------------------------------------------------------- lists
T = TypeVar("T")


class _List(_Closed, Generic[T]):
    """One page, newest first (events: oldest first); pass `last_id` as `after` for the next."""

    object: Literal["list"]
    data: list[T]
    has_more: bool
    last_id: str | None


class JobList(_List[Job]): ...
class ModelList(_List[Model]): ...
class DatasetList(_List[Dataset]): ...
class CheckpointList(_List[Checkpoint]): ...
class WebhookEndpointList(_List[WebhookEndpoint]): ...
class WebhookDeliveryList(_List[WebhookDelivery]): ...


class EventList(_Closed):
    object: Literal["list"]
    data: list[Event]
    has_more: bool
    last_id: int | None = Field(description="pass as `after` for the next page")


class ArchitectureList(_Closed):
    object: Literal["list"]
    data: list[Annotated[Architecture | ArchitectureFamily, Field(discriminator="object")]]
    has_more: bool
    last_id: str | None


# ------------------------------------------------------------------------------- operations
class Health(_Closed):
    status: Literal["ok"]


class Check(_Open):
    """One dependency's state (more keys may say more: workers, free_bytes, ...)."""

    ok: bool
    error: str | None = None
    workers: int | None = None
    free_bytes: int | None = None


class Readiness(_Closed):
    status: Literal["ready"]
    checks: dict[str, Check]
