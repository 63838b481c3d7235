"""The worker's Celery app: core.queue's configuration plus the tasks and process signals.

Start it with `robustify worker` (or `celery -A worker.celery_app worker --concurrency 1`).
"""
from __future__ import annotations

import logging
from typing import Any

from celery import signals

from core.queue import enqueue_job, make_celery
from worker.runtime import reset_after_fork

log = logging.getLogger("robustify.worker")

app = make_celery()
app.conf.include = ["worker.tasks"]
# The service never uses Celery's remote control (cancellation, liveness and recovery go through
# the database), so workers create no pidbox queues: no broker-wide bindings that outlive them.
app.conf.worker_enable_remote_control = False

_maintenance: Any = None


@signals.worker_process_init.connect
def _child_started(**_: Any) -> None:
    # A prefork child inherits the parent's engine: drop it, the child opens its own connections.
    reset_after_fork()


@signals.worker_ready.connect
def _worker_ready(sender: Any = None, **_: Any) -> None:
    """In the parent process: heartbeat row and recovery sweep (no torch, no CUDA here)."""
    global _maintenance
    from worker.sweep import Maintenance

    queues = sorted(sender.app.amqp.queues.consume_from.keys()) if sender is not None else []
    name = getattr(sender, "hostname", None) or "worker"
    _maintenance = Maintenance(name, queues, lambda job_id: enqueue_job(app, job_id))
    _maintenance.start()
    log.info("worker %s ready on queues %s", name, queues)


@signals.worker_shutdown.connect
def _worker_shutdown(**_: Any) -> None:
    if _maintenance is not None:
        _maintenance.stop()
