"""What a job submit refuses because it can be known at submit: a tenant's full share of the
queue, more devices than any live worker offers, a training split too small to fine-tune on.

Each is a problem answer with a stable code naming the field, before anything is stored; what
can only be known later (the worker's own device count when no worker is alive) the worker
checks again before it starts any process (worker/ddp.py).
"""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.compatibility import DatasetFacts
from api.crud import owned
from api.deps import Caller
from api.errors import ApiError
from core.errors import ErrorCode
from core.service.db import Job, WorkerHeartbeat, utcnow
from core.service.settings import Settings

# What a client should wait before submitting again when its queued share is full: about one
# short job's time; the queue drains as workers start jobs.
QUEUED_RETRY_AFTER_SECONDS = 30
# One image to train on, one held out to select the checkpoint (core.engine.defaults.validation_split_size).
MIN_TRAIN_EXAMPLES = 2


def check_queued_share(session: Session, who: Caller, settings: Settings, adding: int = 1) -> None:
    """429 too_many_queued_jobs when this key already has its share of queued jobs (or `adding`
    more, a sweep's children, would pass it)."""
    limit = settings.max_queued_jobs_per_key
    queued = session.scalar(select(func.count()).select_from(Job)
                            .where(owned(Job.owner_key_id, who), Job.status == "queued")) or 0
    if queued + adding > limit:
        raise ApiError(429, ErrorCode.TOO_MANY_QUEUED_JOBS,
                       f"this API key has {queued} jobs queued, its share of the queue "
                       f"(ROBUSTIFY_MAX_QUEUED_JOBS_PER_KEY={limit}); submit again once some have started, "
                       "or cancel queued jobs you no longer need.",
                       headers={"Retry-After": str(QUEUED_RETRY_AFTER_SECONDS)}, queued=queued, limit=limit)


def check_train_size(facts: DatasetFacts) -> None:
    """A fine-tune needs two training images; a data set whose train split has fewer is refused."""
    if facts.train_examples < MIN_TRAIN_EXAMPLES:
        raise ApiError(422, ErrorCode.VALIDATION_ERROR,
                       f"data set {facts.name} has {facts.train_examples} training image(s); fine-tuning needs at "
                       f"least {MIN_TRAIN_EXAMPLES} (one to train on, one held out to select the checkpoint).",
                       errors=[{"loc": ["body", "dataset"], "field": "dataset", "msg": "too few training images",
                                "type": "too_short"}])


def live_device_counts(session: Session, settings: Settings, queue: str) -> list[int | None]:
    """The device count of each live worker serving `queue` (None: a worker that has not said yet)."""
    since = utcnow() - timedelta(seconds=settings.stale_heartbeat_seconds)
    rows = session.execute(select(WorkerHeartbeat.queues, WorkerHeartbeat.devices)
                           .where(WorkerHeartbeat.heartbeat_at >= since)).all()
    return [row.devices for row in rows if queue in (row.queues or [])]


def check_devices(session: Session, settings: Settings, devices: int | None) -> None:
    """422 not_enough_devices when every live worker of the jobs' queue says it has fewer devices.

    With no live worker, or one that has not reported its devices yet, the job is accepted: a
    worker may still start, and the worker refuses the job at claim if it has too few."""
    if devices is None or devices <= 1:
        return
    counts = live_device_counts(session, settings, settings.gpu_queue)
    if not counts or any(c is None for c in counts):
        return
    most = max(c for c in counts if c is not None)
    if devices > most:
        raise ApiError(422, ErrorCode.NOT_ENOUGH_DEVICES,
                       f"the job asks for {devices} devices but the most any live worker offers is {most} "
                       f"({len(counts)} worker(s) on queue {settings.gpu_queue!r}); submit it with devices <= "
                       f"{most}, or start a worker with more devices.",
                       errors=[{"loc": ["body", "config", "devices"], "field": "config.devices",
                                "msg": f"at most {most}", "type": "less_than_equal"}],
                       devices=devices, available=most)
