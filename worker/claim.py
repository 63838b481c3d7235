"""Claiming a job row: the one place that decides whether this delivery may run the job.

A message is only a hint ("look at job X"); the row decides. The claim runs in one write
transaction (SELECT … FOR UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite), so two workers
that receive the same job at the same moment cannot both start it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.errors import ErrorCode
from core.service.db import Job, JobEvent, utcnow
from core.states import TERMINAL_STATES, WORKER_STATES
from worker.runtime import Runtime, heartbeat_is_stale

log = logging.getLogger("robustify.worker")


@dataclass(frozen=True)
class Claim:
    """The outcome: `run` True means this worker now owns the job with `attempt`."""

    run: bool
    reason: str
    attempt: int = 0
    resume_artifact_id: str | None = None


def add_event(session: Session, job_id: str, type: str, message: str, data: dict[str, Any] | None = None,
              level: str = "info") -> None:
    session.add(JobEvent(job_id=job_id, type=type, level=level, message=message, data=data, created_at=utcnow()))


def begin_write(rt: Runtime, session: Session) -> None:
    """Start the session's transaction holding the database's write lock (SQLite only needs it)."""
    if rt.is_sqlite:
        # pysqlite opens transactions lazily; an explicit BEGIN IMMEDIATE takes the write lock now,
        # so the read below and the update after it are one atomic step.
        session.connection().exec_driver_sql("BEGIN IMMEDIATE")


def claim_job(rt: Runtime, job_id: str, owner: str) -> Claim:
    settings = rt.settings
    with rt.session() as session:
        begin_write(rt, session)
        job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None:
            session.rollback()
            return Claim(False, "no such job")
        if job.status in TERMINAL_STATES:
            session.rollback()
            return Claim(False, f"already {job.status}")
        now = utcnow()
        # This very process is not running the job (it is claiming it): a run of its own that ended
        # without recording an outcome (the database was down) counts as gone.
        if (job.status in WORKER_STATES and job.worker_id != owner
                and not heartbeat_is_stale(job.heartbeat_at, job.worker_id, settings)):
            session.rollback()
            return Claim(False, f"duplicate delivery: {job.worker_id} is running it")
        if job.cancel_requested_at is not None or job.status == "cancelling":
            job.status, job.finished_at = "cancelled", now
            job.cancel_requested_at = job.cancel_requested_at or now
            add_event(session, job.id, "status", "job cancelled (its worker had stopped)", {"status": "cancelled"})
            session.commit()
            return Claim(False, "cancelled")
        lost_early = _runs_lost_before_work(session, job)
        if job.attempt >= job.max_attempts or lost_early >= job.max_attempts:
            job.status, job.finished_at = "failed", now
            why = (f"stopped {job.attempt} times while running it" if job.attempt >= job.max_attempts else
                   f"stopped {lost_early} times before the job {_what_it_was_loading(session, job)}")
            job.error = {"code": ErrorCode.WORKER_LOST,
                         "message": f"the job's worker {why} (limit {job.max_attempts}); "
                                    "check the worker logs (out of memory? killed?) and submit the job again."}
            add_event(session, job.id, "status", "job failed: worker lost too many times",
                      {"status": "failed", "error": job.error}, level="error")
            session.commit()
            return Claim(False, "worker_lost")
        # The attempt is counted by the run's first write (worker/hooks.py): a worker killed before
        # doing any work costs the job no attempt.
        attempt = job.attempt + 1
        previous, previous_owner = job.status, job.worker_id
        job.status = "running"
        job.started_at = job.started_at or now
        job.worker_id = owner
        job.heartbeat_at = now
        data = {"status": "running", "attempt": attempt, "worker_id": owner}
        message = f"job started on {owner} (attempt {attempt})"
        if previous == "running":
            message = f"job restarted on {owner} (attempt {attempt}): the previous worker stopped"
            data["previous_worker"] = previous_owner
        add_event(session, job.id, "status", message, data)
        session.commit()
        return Claim(True, "claimed", attempt, job.resume_artifact_id)


def _what_it_was_loading(session: Session, job: Job) -> str:
    """What a run that died before its first write was doing: a job with a training state was
    resuming from its last checkpoint, not starting from scratch."""
    if job.resume_artifact_id is None:
        return "started computing (while loading its model or data)"
    epoch = session.scalar(select(JobEvent.data["epoch"].as_integer()).where(
        JobEvent.job_id == job.id, JobEvent.type == "checkpoint").order_by(JobEvent.id.desc()).limit(1))
    after = f" after epoch {epoch}" if epoch is not None else ""
    return f"resumed computing (while loading its model, data and the training state saved{after})"


def _runs_lost_before_work(session: Session, job: Job) -> int:
    """Runs that started (a `running` status event) but neither counted an attempt nor were
    handed back: their worker died before the recipe began."""
    def count(*where: Any) -> int:
        return int(session.scalar(select(func.count()).select_from(JobEvent).where(
            JobEvent.job_id == job.id, JobEvent.type == "status", *where)) or 0)

    starts = count(JobEvent.data["status"].as_string() == "running")
    handed_back = count(JobEvent.data["reason"].as_string() == "handed_back")
    return max(starts - job.attempt - handed_back, 0)
