"""The two tasks. Messages carry only ids; the database row is the source of truth."""
from __future__ import annotations

from core.queue import TASK_RUN_JOB, TASK_VALIDATE_MODEL
from worker.celery_app import app


@app.task(name=TASK_RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    from worker.jobs import run_job as run

    return run(job_id)


@app.task(name=TASK_VALIDATE_MODEL, acks_late=True, reject_on_worker_lost=True)
def validate_model(model_id: str) -> str:
    from worker.jobs import validate_model as validate

    return validate(model_id)
