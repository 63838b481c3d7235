"""The objects the API returns, as typed pydantic models.

Unknown fields are kept (a newer server may add some; read them as attributes or from
`model_extra`), and every field has a default, so an SDK older than the server keeps working.
Open-ended parts (config, metrics, result, metadata) stay dictionaries.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import Field

from robustify._base import ApiObject
from robustify.results import Outcome

# The server's job vocabulary (core/states.py), copied because the SDK installs without the
# server; tests/service/test_sdk.py checks that the copies are equal.
JobType = Literal["finetune", "evaluate", "sweep"]
JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
JOB_TYPES: tuple[str, ...] = get_args(JobType)
JOB_STATES: tuple[str, ...] = get_args(JobStatus)
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class ErrorInfo(ApiObject):
    """Why a job failed or a model was rejected: a stable code and a message saying what to do."""

    code: str = "error"
    message: str = ""


class Progress(ApiObject):
    fraction: float | None = None
    phase: str | None = None
    epoch: int | None = None
    total_epochs: int | None = None
    step: int | None = None
    total_steps: int | None = None
    eta_seconds: float | None = None


class Job(ApiObject):
    id: str
    object: str = "job"
    type: str | None = None                  # finetune | evaluate | sweep
    status: str = "queued"                   # queued | running | cancelling | succeeded | failed | cancelled
    model_id: str | None = None
    dataset: str | None = None
    threat_model: dict[str, Any] | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    metadata: dict[str, Any] | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress = Field(default_factory=Progress)
    # the run time estimated at submit, by device class (docs/http-api.md); null in lists
    estimate: dict[str, Any] | None = None
    latest_metrics: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    attempt: int = 0
    max_attempts: int | None = None
    cancel_requested_at: datetime | None = None
    webhook: dict[str, Any] | None = None
    urls: dict[str, str | None] = Field(default_factory=dict)
    parent_job_id: str | None = None         # the sweep that started this fine-tune

    @property
    def done(self) -> bool:
        """True once the job reached a final status (succeeded, failed or cancelled)."""
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @property
    def improved(self) -> bool | None:
        """A finished fine-tune: True when the checkpoint it hands back beat the input model under
        the selection rule, False when it hands back the input model itself; None otherwise."""
        value = (self.result or {}).get("improved")
        return value if isinstance(value, bool) else None

    @property
    def outcome(self) -> Outcome | None:
        """The result typed: intervals, preset, audit, per-class numbers, verdict (robustify.results)."""
        return Outcome.model_validate(self.result) if self.result else None


class SanityVariant(ApiObject):
    """One cheap variant of the input the sanity check tried (ImageNet's or no normalisation, the
    channels reversed, 0..255 pixels) and whether it fixes the accuracy."""

    name: str = ""
    description: str = ""
    cause: str | None = None                 # normalisation | channel_order | pixel_range
    accuracy: float | None = None
    correct: int | None = None
    n: int | None = None
    ci95: list[float] | None = None
    fixes: bool = False


class SanityCheck(ApiObject):
    """A model's clean accuracy on a seeded sample of its data set's test split, measured when it was
    validated. `status` is passed, warning (the message names the likely cause; the model is still
    ready) or skipped (the message says why)."""

    status: str = "skipped"                  # passed | warning | skipped
    dataset: str | None = None
    split: str | None = None
    accuracy: float | None = None
    correct: int | None = None
    n: int | None = None
    ci95: list[float] | None = None          # 95 % Wilson interval
    chance: float | None = None
    near_chance: bool | None = None
    seed: int | None = None
    likely_cause: str | None = None          # normalisation | channel_order | pixel_range | num_classes
    variants: list[SanityVariant] = Field(default_factory=list)
    message: str = ""
    seconds: float | None = None

    @property
    def warning(self) -> bool:
        return self.status == "warning"


class Model(ApiObject):
    id: str
    object: str = "model"
    name: str | None = None
    source: str | None = None                # upload | robustbench | job
    architecture: str | None = None
    num_classes: int | None = None
    dataset: str | None = None
    input_size: list[int] | None = None      # [C, H, W]
    input_shape: list[int] | None = None     # the former name of input_size
    input_mean: list[float] | None = None
    input_std: list[float] | None = None
    threat_model: str | None = None
    status: str = "validating"               # validating | ready | rejected
    parent_model_id: str | None = None       # a fine-tune's result: the model it started from
    source_job_id: str | None = None
    error: ErrorInfo | None = None
    metadata: dict[str, Any] | None = None
    sha256: str | None = None
    size: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    urls: dict[str, str | None] = Field(default_factory=dict)
    sanity_check: SanityCheck | None = None  # clean accuracy on a sample of its data set, once ready


class DatasetWarning(ApiObject):
    """A census warning: a class missing from a split, or a split badly imbalanced."""

    code: str = ""                           # class_missing | class_imbalance
    split: str | None = None
    classes: list[int] = Field(default_factory=list)
    message: str = ""


class Dataset(ApiObject):
    id: str
    object: str = "dataset"
    name: str | None = None
    status: str | None = None
    num_examples: int | None = None
    num_classes: int | None = None
    image_shape: list[int] | None = None
    class_names: list[str] | None = None
    splits: dict[str, int] | None = None
    class_counts: dict[str, list[int]] | None = None   # split -> images per class (label order)
    warnings: list[DatasetWarning] = Field(default_factory=list)
    sha256: str | None = None
    size: int | None = None
    metadata: dict[str, Any] | None = None
    created_at: datetime | None = None
    urls: dict[str, str | None] = Field(default_factory=dict)


class Event(ApiObject):
    id: int
    object: str = "event"
    job_id: str | None = None
    type: str = "status"                     # status | progress | metrics | checkpoint | warning | log
    level: str = "info"
    message: str = ""
    data: dict[str, Any] | None = None
    created_at: datetime | None = None


class Checkpoint(ApiObject):
    id: str
    object: str = "checkpoint"
    job_id: str | None = None
    epoch: int | None = None
    is_best: bool = False
    metrics: dict[str, Any] | None = None
    sha256: str | None = None
    size: int | None = None
    filename: str | None = None
    created_at: datetime | None = None
    urls: dict[str, str | None] = Field(default_factory=dict)


class WebhookEndpoint(ApiObject):
    id: str
    object: str = "webhook_endpoint"
    url: str = ""
    secret: str | None = None                # whsec_…: verify signatures with it (robustify.webhooks.verify)
    events: list[str] | None = None          # None: every event type
    default: bool = False
    description: str | None = None
    created_at: datetime | None = None


class WebhookAttempt(ApiObject):
    at: datetime | None = None
    status_code: int | None = None
    error: str | None = None
    duration_ms: int | None = None


class WebhookDelivery(ApiObject):
    id: str                                  # the webhook-id header: the same on every retry
    object: str = "webhook_delivery"
    job_id: str | None = None
    endpoint_id: str | None = None
    event_type: str | None = None
    status: str = "pending"                  # pending | succeeded | failed
    attempts: list[WebhookAttempt] = Field(default_factory=list)
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None
    created_at: datetime | None = None


class Deleted(ApiObject):
    id: str
    object: str | None = None
    deleted: bool = True
