"""The JSON objects the API returns, as pydantic models: what the routes answer, and so the
typed schemas of /openapi.json (Job, Model, Dataset, Checkpoint, Event, WebhookEndpoint,
WebhookDelivery, the list envelopes, health and architectures).

Each resource model builds itself from its database row (`Job.from_row(job)`), so a shape is
written once. A top-level object forbids unknown fields; the open-ended parts (config, result,
metrics, metadata, progress) stay objects that accept any key.
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.engine.data.cards import CARDS
from core.engine.data.census import census_warnings
from core.engine.sanity import SANITY_CHECK_KEY
from core.service import db
from core.states import JobStatus, JobType

# An ISO 8601 UTC time as the API writes it ("2026-01-31T12:00:00.123456Z"); kept a string so
# that the answer is byte for byte what the route built.
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
# A JSON number written as it came (an int stays an int, a float a float).
Number = int | float


def ts(value: datetime | None) -> str | None:
    """A stored time as the API writes it: ISO 8601 in UTC with a Z."""
    value = db.as_utc(value)
    return value.isoformat().replace("+00:00", "Z") if value else None


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


class DeviceEstimate(_Open):
    """The estimate on an idle worker of one device class."""

    seconds: Number = Field(description="the median over the class's live workers (over every worker that "
                                        "recorded one when none is live)")
    basis: Literal["measured", "scaled", "reference"] = Field(
        description="measured: jobs of this architecture at this input size ran on the class; scaled: they ran "
                    "on another class, scaled by the two classes' reference timings; reference: never run, the "
                    "reference model's timing scaled by parameters × pixels (can be several times off)")
    workers_seen: int = Field(description="live workers of the class")
    workers_calibrated: int = Field(description="workers of the class that ever recorded a calibration")
    range_seconds: list[Number] = Field(description="the smallest and largest of the workers' estimates")


class JobEstimate(_Open):
    """How long the job should run on an idle worker of each device class, made at submit from the
    workers' calibrations (docs/runtimes.md, "Before you submit: the estimate")."""

    kind: str | None = Field(description="the architecture at its input size, e.g. small-cnn@1x8x8")
    passes: dict[str, dict[str, Number]] = Field(
        description="image forward/backward passes per phase and in total, by device type (cpu, cuda)")
    devices: dict[str, DeviceEstimate] = Field(description="by device class: cpu, or cuda:<GPU name>")
    reason: str | None = Field(description="why `devices` is empty (no worker has calibrated yet), else null")


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
    """A fine-tuning, evaluation or sweep job."""

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
    estimate: JobEstimate | None = Field(
        default=None, description="the run time estimated at submit, per device class (null in lists, and for "
                                  "jobs submitted before estimates)")
    latest_metrics: LatestMetrics
    result: dict[str, Any] | None = Field(description="a finished job's summary: before/after numbers of a "
                                                      "fine-tune, the headline numbers of an evaluation")
    error: ErrorInfo | None
    attempt: int
    max_attempts: int | None
    cancel_requested_at: Timestamp | None
    webhook: JobWebhookInfo | None
    urls: JobUrls
    parent_job_id: str | None = Field(default=None, description="the sweep job that started this fine-tune")

    @classmethod
    def from_row(cls, j: db.Job, estimate: dict[str, Any] | None = None) -> Job:
        # every progress and metric key is present (null until the worker reports it)
        progress: dict[str, Any] = dict.fromkeys(Progress.model_fields)
        progress["fraction"] = 1.0 if j.status == "succeeded" else 0.0
        base = f"/v1/jobs/{j.id}"
        return cls(
            id=j.id, object="job", type=j.type, status=j.status, model_id=j.model_id, dataset=j.dataset,
            threat_model=j.threat_model, config=j.config, seed=j.seed, metadata=j.meta,
            created_at=ts(j.created_at), started_at=ts(j.started_at), finished_at=ts(j.finished_at),
            progress=Progress.model_validate({**progress, **(j.progress or {})}),
            estimate=JobEstimate.model_validate(estimate) if estimate is not None else None,
            latest_metrics=LatestMetrics.model_validate({**dict.fromkeys(LatestMetrics.model_fields),
                                                         **(j.latest_metrics or {})}),
            result=j.result, error=j.error, attempt=j.attempt, max_attempts=j.max_attempts,
            cancel_requested_at=ts(j.cancel_requested_at),
            webhook=(JobWebhookInfo(endpoint_id=j.webhook_endpoint_id, events=j.webhook_events)
                     if j.webhook_endpoint_id else None),
            urls=JobUrls(self_=base, cancel=f"{base}/cancel", events=f"{base}/events",
                         checkpoint=f"{base}/checkpoint", report=f"{base}/report"),
            parent_job_id=j.parent_job_id,
        )


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

    @classmethod
    def from_row(cls, e: db.JobEvent) -> Event:
        return cls(id=e.id, object="event", job_id=e.job_id, type=e.type, level=e.level, message=e.message,
                   data=e.data, created_at=ts(e.created_at))


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

    @classmethod
    def from_row(cls, a: db.Artifact) -> Checkpoint:
        return cls(id=a.id, object="checkpoint", job_id=a.job_id, epoch=a.epoch, is_best=bool(a.is_best),
                   metrics=a.data, sha256=a.sha256, size=a.size, filename=a.filename, created_at=ts(a.created_at),
                   urls=CheckpointUrls(content=f"/v1/jobs/{a.job_id}/checkpoints/{a.id}/content"))


class Report(_Open):
    """The report of a finished job (report.json): a fine-tune's before/after numbers, history and
    provenance, or an evaluation's curves; see docs/concepts.md for every field."""

    type: JobType


# ------------------------------------------------------------------------------- models, datasets
class ModelUrls(_Closed):
    self_: str = Field(alias="self")
    content: str | None = Field(description="the weights; null when none are stored (RobustBench, Hub)")


class SanityVariant(_Closed):
    """One cheap variant of the input that the sanity check tried on the same images."""

    name: str = Field(description="imagenet_normalisation, dataset_normalisation, no_normalisation, "
                                  "channels_reversed or pixels_0_255")
    description: str
    cause: Literal["normalisation", "channel_order", "pixel_range"] = Field(description="the cause it tests")
    accuracy: float
    correct: int
    n: int = Field(description="images it ran on: the sample's first 64, or the whole sample when promising")
    ci95: list[float] = Field(description="95 % Wilson interval of the accuracy")
    fixes: bool = Field(description="on the whole sample its interval lies above the registered model's, and its "
                                    "accuracy is not near chance")


class SanityCheck(_Closed):
    """The model's clean accuracy on a seeded, stratified sample of its data set's test split, measured
    when it was validated; a warning (never a rejection) when it looks wrong (docs/concepts.md)."""

    status: Literal["passed", "warning", "skipped"] = Field(
        description="warning: near chance, or a cheap variant of the input does clearly better; skipped: the "
                    "data set was not available to the worker (the message says why)")
    dataset: str
    split: str
    accuracy: float | None
    correct: int | None
    n: int | None = Field(description="images in the sample")
    ci95: list[float] | None = Field(description="95 % Wilson interval of the accuracy")
    chance: float | None = Field(description="1 / num_classes")
    near_chance: bool | None
    seed: int = Field(description="seed of the stratified sample")
    likely_cause: Literal["normalisation", "channel_order", "pixel_range", "num_classes"] | None
    variants: list[SanityVariant]
    message: str = Field(description="the result in plain words; a warning names the likely cause")
    seconds: float


def _sanity_and_metadata(m: db.Model) -> tuple[SanityCheck | None, dict[str, Any] | None]:
    """The row's stored sanity check (ready models only), and the caller's own metadata without it."""
    if m.meta is None:
        return None, None
    meta = dict(m.meta)
    stored = meta.pop(SANITY_CHECK_KEY, None)
    check = None
    if m.status == "ready" and isinstance(stored, dict):
        try:
            check = SanityCheck.model_validate(stored)
        except ValidationError:  # written by another version of the worker: not shown
            check = None
    return check, (meta or None) if SANITY_CHECK_KEY in m.meta else meta


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
    sanity_check: SanityCheck | None = Field(
        default=None, description="clean accuracy on a sample of its data set, measured at validation; null "
                                  "while validating, for a fine-tune's result, or a model validated before the check")

    @classmethod
    def from_row(cls, m: db.Model, weights: db.Artifact | None) -> Model:
        """`weights`: the row of its stored weights file (None: none stored, e.g. RobustBench)."""
        check, metadata = _sanity_and_metadata(m)
        return cls(
            id=m.id, object="model", name=m.name, source=m.source, architecture=m.architecture,
            num_classes=m.num_classes, dataset=m.dataset, input_size=m.input_shape, input_shape=m.input_shape,
            input_mean=m.input_mean, input_std=m.input_std, threat_model=m.threat_model, status=m.status,
            parent_model_id=m.parent_model_id, source_job_id=m.source_job_id, error=m.error, metadata=metadata,
            sha256=weights.sha256 if weights else None, size=weights.size if weights else None,
            created_at=ts(m.created_at), updated_at=ts(m.updated_at),
            urls=ModelUrls(self_=f"/v1/models/{m.id}", content=f"/v1/models/{m.id}/content" if weights else None),
            sanity_check=check,
        )


class DatasetUrls(_Closed):
    self_: str = Field(alias="self")


class DatasetWarning(_Closed):
    """A census warning (core/engine/data/census.py): a split cannot represent the task."""

    code: Literal["class_missing", "class_imbalance"]
    split: str = Field(description="train or test")
    classes: list[int] = Field(description="the missing classes; for an imbalance the smallest and the largest")
    message: str


class DatasetSplitRule(_Closed):
    rule: Literal["published", "stratified"] = Field(
        description="published: the source's own train and test files; stratified: robustify's own per-class "
                    "split (core.engine.data.npz.stratified_split)")
    description: str
    test_fraction: float | None = Field(description="share of each class held out (stratified only)")
    seed: int | None = Field(description="seed of numpy's default_rng that draws the split (stratified only)")


class DatasetCard(_Closed):
    """Where a built-in data set comes from and how robustify splits it (core/engine/data/cards.py)."""

    title: str
    source: str
    url: str
    license: str
    pixels: str = Field(description="how the stored uint8 pixels relate to the source's values")
    split: DatasetSplitRule
    counts_from: Literal["loader", "source"] = Field(
        description="loader: class_counts recounted from the loaded data by the test suite; source: as the source "
                    "publishes them (the data is not on the test machines)")
    reproduce: str = Field(description="Python that builds the same train and test splits: train a model you "
                                       "upload on the train part only")
    notes: list[str]


class Dataset(_Closed):
    """An uploaded data set, stored as the project's .npz (or a built-in one, by its name)."""

    id: str
    object: Literal["dataset"]
    name: str
    status: str
    num_examples: int
    num_classes: int
    image_shape: list[int] = Field(description="[C, H, W]")
    class_names: list[str] | None
    splits: dict[str, int] | None = Field(description="examples per split of an image-folder upload")
    class_counts: dict[str, list[int]] | None = Field(
        description="images per class (label order) in the train and test splits a job uses; null for a data "
                    "set uploaded before the census")
    warnings: list[DatasetWarning] = Field(
        description="class_missing: a class without images in a split; class_imbalance: largest / smallest "
                    "class > 10 within a split")
    sha256: str | None
    size: int | None
    metadata: dict[str, Any] | None
    created_at: Timestamp | None
    urls: DatasetUrls
    card: DatasetCard | None = Field(default=None, description="a built-in data set's card: source, split rule "
                                                              "and seed, licence; null for an upload")

    @classmethod
    def from_row(cls, d: db.Dataset, artifact: db.Artifact | None) -> Dataset:
        return cls(
            id=d.id, object="dataset", name=d.name, status=d.status, num_examples=d.num_examples,
            num_classes=d.num_classes, image_shape=d.image_shape, class_names=d.class_names, splits=d.splits,
            class_counts=d.class_counts, warnings=census_warnings(d.class_counts or {}, d.class_names),
            sha256=artifact.sha256 if artifact else None, size=artifact.size if artifact else None,
            metadata=d.meta, created_at=ts(d.created_at), urls=DatasetUrls(self_=f"/v1/datasets/{d.id}"),
        )

    @classmethod
    def builtin(cls, name: str) -> Dataset:
        """A built-in data set with its card, counted as the engine loads it (census.BUILTIN_CLASS_COUNTS)."""
        card = CARDS[name]
        counts = card.class_counts
        splits = {split: sum(per_class) for split, per_class in counts.items()}
        return cls(
            id=name, object="dataset", name=name, status="ready", num_examples=sum(splits.values()),
            num_classes=len(counts["train"]), image_shape=list(card.image_shape), class_names=list(card.class_names),
            splits=splits, class_counts=counts, warnings=census_warnings(counts, card.class_names), sha256=None,
            size=None, metadata=None, created_at=None, urls=DatasetUrls(self_=f"/v1/datasets/{name}"),
            card=DatasetCard.model_validate(card.as_dict()),
        )


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

    @classmethod
    def from_row(cls, e: db.WebhookEndpoint) -> WebhookEndpoint:
        return cls(id=e.id, object="webhook_endpoint", url=e.url, secret=e.secret, events=e.events,
                   default=bool(e.is_default), description=e.description, created_at=ts(e.created_at))


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

    @classmethod
    def from_row(cls, d: db.WebhookDelivery) -> WebhookDelivery:
        return cls(id=d.id, object="webhook_delivery", job_id=d.job_id, endpoint_id=d.endpoint_id,
                   event_type=d.event_type, status=d.status,
                   attempts=[WebhookAttempt.model_validate(a) for a in d.attempt_log or []],
                   next_attempt_at=ts(d.next_attempt_at) if d.status == "pending" else None,
                   delivered_at=ts(d.delivered_at), created_at=ts(d.created_at))


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

    @classmethod
    def page(cls, items: Sequence[Any], has_more: bool = False) -> Self:
        """One page of `items` (resource models); `last_id` is the last one's id."""
        return cls(object="list", data=list(items), has_more=has_more, last_id=items[-1].id if items else None)


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

    @classmethod
    def page(cls, items: Sequence[Event], has_more: bool) -> Self:
        return cls(object="list", data=list(items), has_more=has_more, last_id=items[-1].id if items else None)


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
    checks: dict[str, Check] | None = Field(
        default=None, description="each part's check; shown without keys, or to an API key or the operator token")
