"""The two tasks. Messages carry only ids; the database row is the source of truth.

A task that cannot reach the database gives its message back to the broker (Reject with
requeue) instead of acknowledging and so dropping it; so does a job message that reaches a
worker that is shutting down.
"""
from __future__ import annotations

from collections.abc import Callable

from celery.exceptions import Reject

from core.service.queue import TASK_RUN_JOB, TASK_VALIDATE_MODEL
from worker.celery_app import app
from worker.outage import DatabaseUnavailable
from worker.runtime import worker_stopping


def _requeued_on_outage(run: Callable[[str], str], ident: str) -> str:
    try:
        return run(ident)
    except DatabaseUnavailable as exc:
        raise Reject(str(exc), requeue=True) from exc


@app.task(name=TASK_RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    from worker.jobs import run_job as run
    from worker.sweepjob import run_sweep_task, settle_parent_of

    if worker_stopping():  # not started here: the message waits for another worker, or the next start
        raise Reject(f"job {job_id} left in the queue: this worker is shutting down", requeue=True)
    settled = _requeued_on_outage(lambda i: run_sweep_task(i) or "", job_id)  # a sweep is settled, not run
    if settled:
        return settled
    outcome = _requeued_on_outage(run, job_id)
    settle_parent_of(job_id)   # a sweep's child ended (or was refused): its sweep may be done
    return outcome


@app.task(name=TASK_VALIDATE_MODEL, acks_late=True, reject_on_worker_lost=True)
def validate_model(model_id: str) -> str:
    from worker.validate import validate_model as validate

    return _requeued_on_outage(validate, model_id)
