"""SQLAlchemy 2 models: API keys, models, data sets, jobs, job events, artifacts, webhooks.

The job row is the single source of truth of a job's state (never Celery's result backend).
The schema changes only through Alembic migrations (migrations/versions); a test compares the
migrated schema with these models.
"""
from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """Sortable-enough, unguessable ids such as `job_1a2b…` (prefix says the resource)."""
    return f"{prefix}_{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


def _ts(nullable: bool = True) -> Any:
    return mapped_column(DateTime(timezone=True), nullable=nullable)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16), index=True)       # shown to humans: rk_ab12…
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)    # sha256 hex of the full key
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = _ts()


class Artifact(Base):
    """A content-addressed file in the artifact store (weights, checkpoints, reports, plots)."""

    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_key_id: Mapped[str | None] = mapped_column(String(40), index=True)
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE", use_alter=True, name="fk_artifacts_job_id"),
        index=True,
    )
    # model_weights | checkpoint | training_state | report | plot | dataset
    kind: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(100))
    filename: Mapped[str] = mapped_column(String(255))
    epoch: Mapped[int | None] = mapped_column(Integer)
    is_best: Mapped[bool | None] = mapped_column()
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # metrics of a checkpoint, etc.
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_key_id: Mapped[str | None] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(20))  # upload | robustbench | hf-hub | job
    architecture: Mapped[str] = mapped_column(String(200))
    num_classes: Mapped[int] = mapped_column(Integer)
    dataset: Mapped[str] = mapped_column(String(100))
    input_shape: Mapped[list[Any] | None] = mapped_column(JSON)  # [C, H, W]; the API calls it input_size
    # The engine feeds the network (x - input_mean) / input_std for x in [0, 1] (core/engine/input_contract.py).
    input_mean: Mapped[list[Any] | None] = mapped_column(JSON)
    input_std: Mapped[list[Any] | None] = mapped_column(JSON)
    # A fine-tune's result: the model it started from and the job that made it. Plain ids, no
    # foreign keys: models are only ever soft-deleted and jobs are kept, so both rows stay.
    parent_model_id: Mapped[str | None] = mapped_column(String(40), index=True)
    source_job_id: Mapped[str | None] = mapped_column(String(40), index=True)
    threat_model: Mapped[str | None] = mapped_column(String(40))  # RobustBench threat model, e.g. Linf
    status: Mapped[str] = mapped_column(String(20), default="validating")  # validating | ready | rejected
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    weights_artifact_id: Mapped[str | None] = mapped_column(ForeignKey("artifacts.id", ondelete="SET NULL"))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    # Deleting a model keeps its row (finished jobs still point at it) but hides it everywhere.
    deleted_at: Mapped[datetime | None] = _ts()


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_key_id: Mapped[str | None] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="ready")
    num_examples: Mapped[int] = mapped_column(Integer)
    num_classes: Mapped[int] = mapped_column(Integer)
    image_shape: Mapped[list[Any]] = mapped_column(JSON)  # [C, H, W]
    class_names: Mapped[list[Any] | None] = mapped_column(JSON)  # label i is class_names[i] (image folders)
    splits: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {"train": n, "test": m} when stored split
    class_counts: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # split -> images per class (census.py)
    artifact_id: Mapped[str | None] = mapped_column(ForeignKey("artifacts.id", ondelete="SET NULL"))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_key_id", "idempotency_key", name="uq_jobs_owner_idempotency"),
        # NULLs are distinct in the constraint above, so with auth off (no owner) only this
        # partial index stops two concurrent submissions with one Idempotency-Key.
        Index("uq_jobs_idempotency_no_owner", "idempotency_key", unique=True,
              postgresql_where=text("owner_key_id IS NULL"), sqlite_where=text("owner_key_id IS NULL")),
        Index("ix_jobs_owner_created", "owner_key_id", "created_at"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_key_id: Mapped[str | None] = mapped_column(String(40))
    type: Mapped[str] = mapped_column(String(20))  # one of core.states.JOB_TYPES
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    # one of core.states.JOB_STATES
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    dataset: Mapped[str] = mapped_column(String(100))  # built-in name or a dataset id
    threat_model: Mapped[dict[str, Any]] = mapped_column(JSON)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker_id: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[datetime | None] = _ts()
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    latest_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    resume_artifact_id: Mapped[str | None] = mapped_column(String(40))  # last training state
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = _ts()
    finished_at: Mapped[datetime | None] = _ts()
    cancel_requested_at: Mapped[datetime | None] = _ts()
    # where this job's webhooks go (a webhook_endpoints id) and which event types; see core/service/webhooks.py
    webhook_endpoint_id: Mapped[str | None] = mapped_column(String(40))
    webhook_events: Mapped[list[Any] | None] = mapped_column(JSON)
    # A fine-tune started by a sweep job names it (worker/sweepjob.py); a plain id, as the model's lineage.
    parent_job_id: Mapped[str | None] = mapped_column(String(40), index=True)


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(40))  # status | progress | metrics | checkpoint | model | warning | log
    level: Mapped[str] = mapped_column(String(10), default="info")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WorkerHeartbeat(Base):
    """One row per live worker process, refreshed every few seconds; /readyz reads it."""

    __tablename__ = "worker_heartbeats"
    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # Celery hostname, e.g. gpu0@host
    # The queue names it consumes, then (once measured) one object {"calibration": {...}}: its device
    # class, the reference timing it took at start and the kinds of job it ran (core/service/calibration.py).
    # Read them with heartbeat_queues() and heartbeat_calibration().
    queues: Mapped[list[Any] | None] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    # What one job may train on here (worker/devices.py): the GPUs it sees, or on a CPU-only worker one
    # gloo rank per CPU core; null until the worker has probed (the API then cannot refuse by it).
    devices: Mapped[int | None] = mapped_column(Integer)
    device_type: Mapped[str | None] = mapped_column(String(20))   # "cuda" | "cpu"


class WebhookEndpoint(Base):
    """A URL that receives signed webhooks, with its signing secret (per endpoint, as Standard
    Webhooks asks). `is_default`: every job of the owner that names no webhook uses it."""

    __tablename__ = "webhook_endpoints"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_key_id: Mapped[str | None] = mapped_column(String(40), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(100))          # whsec_<base64>; HMAC needs it in clear
    events: Mapped[list[Any] | None] = mapped_column(JSON)    # None: every event type
    is_default: Mapped[bool] = mapped_column(default=False)
    description: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = _ts()


class WebhookDelivery(Base):
    """One webhook message and its delivery attempts (the outbox the worker's dispatcher drains)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # msg_…: the webhook-id header
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event_type: Mapped[str] = mapped_column(String(40))
    payload: Mapped[str] = mapped_column(Text)                  # the exact body that is signed
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending | succeeded | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    attempt_log: Mapped[list[Any] | None] = mapped_column(JSON)  # [{at, status_code, error, duration_ms}]
    next_attempt_at: Mapped[datetime | None] = _ts()
    locked_until: Mapped[datetime | None] = _ts()               # a dispatcher's lease on the row
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = _ts()


def heartbeat_queues(row: WorkerHeartbeat) -> list[str]:
    """The queue names a heartbeat row states (its `queues` column less the calibration object)."""
    return [q for q in (row.queues or []) if isinstance(q, str)]


def heartbeat_calibration(row: WorkerHeartbeat) -> dict[str, Any] | None:
    """The calibration a heartbeat row carries (core/service/calibration.py), or None."""
    for item in row.queues or []:
        if isinstance(item, dict) and isinstance(item.get("calibration"), dict):
            return dict(item["calibration"])
    return None


def set_heartbeat_calibration(row: WorkerHeartbeat, calibration: dict[str, Any]) -> None:
    row.queues = [*heartbeat_queues(row), {"calibration": calibration}]


def record_worker_heartbeat(session: Any, worker_id: str, queues: list[str] | None = None,
                            devices: tuple[int, str] | None = None,
                            calibration: dict[str, Any] | None = None) -> None:
    """Insert or refresh a worker's heartbeat row, with its (device count, device type) and its
    start calibration once known (the caller commits). The kinds of job the worker's processes
    recorded in the row's calibration are kept."""
    row = session.get(WorkerHeartbeat, worker_id, with_for_update=True)
    if row is None:
        row = WorkerHeartbeat(id=worker_id, queues=queues, heartbeat_at=utcnow())
        session.add(row)
    else:
        row.heartbeat_at = utcnow()
    held = heartbeat_calibration(row)
    if calibration is not None:
        held = {**calibration, "kinds": {**(held or {}).get("kinds", {}), **calibration.get("kinds", {})}}
    if queues is not None or calibration is not None:
        names = queues if queues is not None else heartbeat_queues(row)
        stated = [*names, {"calibration": held}] if held else list(names)
        if stated != row.queues:
            row.queues = stated
    if devices is not None:
        row.devices, row.device_type = devices


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every timestamp stored here is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)

