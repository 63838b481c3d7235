"""The worker's Celery app: core.service.queue's configuration plus the tasks and process signals.

Start it with `robustify worker` (or `celery -A worker.celery_app worker --concurrency 1`).

SIGTERM (docker stop, a deploy) is a warm shutdown: the parent stops taking messages and passes
the signal to the pool process that runs a job, which stops at its next check, saves a checkpoint
and is handed back to the queue (worker/jobs.py); then the worker exits. No job waits for a
whole run to end, and none is lost.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any

from billiard.process import current_process
from celery import signals

from core.service.queue import enqueue_job, make_celery
from worker.runtime import mark_worker_stopping, reset_after_fork, shutdown_requested

log = logging.getLogger("robustify.worker")

app = make_celery()
app.conf.include = ["worker.tasks"]
# The service never uses Celery's remote control (cancellation, liveness and recovery go through
# the database), so workers create no pidbox queues: no broker-wide bindings that outlive them.
app.conf.worker_enable_remote_control = False

_maintenance: Any = None
_webhooks: Any = None
_billiard_term: Any = None
# `robustify serve` and `demo` quiet Celery's own INFO lines, keeping the job lifecycle lines.
quiet_libraries = False


@signals.setup_logging.connect
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    """Our handler and format (text, or JSON with the job context) instead of Celery's."""
    from core.service.logs import configure_logging
    from core.service.settings import get_settings

    settings = get_settings()
    level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else (loglevel or settings.log_level)
    configure_logging(fmt=settings.log_format, component="worker", level=str(level),
                      library_level="WARNING" if quiet_libraries else None)


def _request_shutdown(*_: Any) -> None:
    shutdown_requested.set()


@signals.worker_process_init.connect
def _child_started(**_: Any) -> None:
    # A prefork child inherits the parent's engine: drop it, the child opens its own connections.
    reset_after_fork()
    shutdown_requested.clear()


@signals.task_prerun.connect
def _task_starting(**_: Any) -> None:
    """In a pool process, while a task runs, SIGTERM asks its job to stop and be handed back
    (billiard's own handler would exit on the spot and lose the epoch's work)."""
    global _billiard_term
    if current_process().name != "MainProcess":
        _billiard_term = signal.signal(signal.SIGTERM, _request_shutdown)


@signals.task_postrun.connect
def _task_finished(**_: Any) -> None:
    if current_process().name != "MainProcess" and _billiard_term is not None:
        signal.signal(signal.SIGTERM, _billiard_term)  # an idle pool process stops as billiard expects


@signals.worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    """In the parent, from its signal handler (so: no logging here): tell the pool processes that
    run a job (and, for the solo pool, this process) to hand it back.

    Idle pool processes are left to Celery's warm shutdown, which closes them: one killed while
    it holds the pool's shared queue lock would leave this process waiting for that lock at exit
    for ever, and the pool forks a replacement for every one killed."""
    _request_shutdown()
    mark_worker_stopping()
    for pid in _busy_pool_processes():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue


def _busy_pool_processes() -> set[int]:
    """The pool processes running a task (Celery's accepted requests name them)."""
    from celery.worker import state

    for _ in range(3):
        try:
            return {r.worker_pid for r in list(state.active_requests) if r.worker_pid not in (None, os.getpid())}
        except RuntimeError:  # a pool thread changed the set while it was being copied
            continue
    return set()


@signals.worker_ready.connect
def _worker_ready(sender: Any = None, **_: Any) -> None:
    """In the parent process: heartbeat row, recovery sweep, webhook dispatch (no torch, no CUDA here)."""
    global _maintenance, _webhooks
    from worker.sweep import Maintenance
    from worker.webhooks import WebhookDispatcher

    queues = sorted(sender.app.amqp.queues.consume_from.keys()) if sender is not None else []
    name = getattr(sender, "hostname", None) or "worker"
    _maintenance = Maintenance(name, queues, lambda job_id: enqueue_job(app, job_id))
    _maintenance.start()
    _webhooks = WebhookDispatcher().start()
    log.info("worker %s ready on queues %s", name, queues)


@signals.worker_shutdown.connect
def _worker_shutdown(**_: Any) -> None:
    if _maintenance is not None:
        _maintenance.stop()
    if _webhooks is not None:
        _webhooks.stop()
