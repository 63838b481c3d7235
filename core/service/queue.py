"""The Celery application's configuration and the two task names, shared by API and worker.

The API enqueues by task name (it never imports the worker package or torch); messages carry
only ids, the database row is the truth. Settings follow architecture.md: JSON only, late
acks, requeue on a lost worker, prefetch 1, a visibility timeout above the longest job.
"""
from __future__ import annotations

from celery import Celery

from core.service.settings import Settings, get_settings

TASK_RUN_JOB = "robustify.run_job"
TASK_VALIDATE_MODEL = "robustify.validate_model"


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("robustify", broker=settings.resolved_broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings),
        task_routes={
            TASK_RUN_JOB: {"queue": settings.gpu_queue},
            TASK_VALIDATE_MODEL: {"queue": settings.cpu_queue},
        },
        task_default_queue=settings.cpu_queue,
    )
    return app


def _transport_options(settings: Settings) -> dict:
    """Broker-specific options. kombu's SQLAlchemy transport hands its options to create_engine,
    so it must not get `visibility_timeout` (Redis/SQS only); on SQLite it gets a busy timeout,
    since the API and the worker write the broker file at the same time."""
    url = settings.resolved_broker_url
    if url.startswith("sqla+"):
        return {"connect_args": {"timeout": 30}} if url.startswith("sqla+sqlite") else {}
    return {"visibility_timeout": settings.visibility_timeout_seconds}


def enqueue_job(app: Celery, job_id: str) -> None:
    app.send_task(TASK_RUN_JOB, args=[job_id])


def enqueue_model_validation(app: Celery, model_id: str) -> None:
    app.send_task(TASK_VALIDATE_MODEL, args=[model_id])
