"""Running a claimed job: the task's entry point, from the claim to a recorded end.

The pieces live beside it: worker/hooks.py (the recipe's hooks: progress, checkpoints, cancels),
worker/inputs.py (the job's model, data and resume state, read by `set_up_job` for one device and
for every DDP rank alike), worker/finish.py (storing results, recording failures), worker/ddp.py
(a job on several devices) and worker/validate.py (model validation). Torch and the engine are
imported inside the functions, never at module import: the worker's parent process must not
touch CUDA (fork and CUDA do not mix), and the API imports nothing here.
"""
from __future__ import annotations

import logging
import time

from sqlalchemy import select

from core.service.db import Job
from core.service.logs import job_context
from core.service.queue import enqueue_job
from core.states import WORKER_STATES
from worker.calibration import record_job_timing
from worker.claim import add_event, claim_job
from worker.ddp import devices_for, run_distributed
from worker.finish import fail_job, finish_evaluate, finish_finetune
from worker.hooks import HandBack, Heartbeat, JobHooks, LostOwnership
from worker.inputs import set_up_job
from worker.outage import DatabaseUnavailable, is_database_down, retry_while_down
from worker.runtime import Runtime, runtime, worker_id

log = logging.getLogger("robustify.worker")


def run_job(job_id: str) -> str:
    """Claim, run and finish one job; returns a short word for the log. Never raises for job errors;
    raises DatabaseUnavailable when the database stays unreachable (the task requeues its message).
    A BaseException (SystemExit, KeyboardInterrupt) stops this process, not the job: it is not
    recorded as a failure, the message comes back (reject_on_worker_lost) and the job resumes from
    its last checkpoint."""
    rt = runtime()
    owner = worker_id()
    try:
        claim = retry_while_down(lambda: claim_job(rt, job_id, owner), seconds=rt.settings.stale_heartbeat_seconds,
                                 what=f"claim of job {job_id}")
    except Exception as exc:
        if is_database_down(exc):
            raise DatabaseUnavailable(f"job {job_id} could not be read: {type(exc).__name__}") from exc
        raise
    if not claim.run:
        log.info("job %s not run: %s", job_id, claim.reason)
        return claim.reason
    hb = Heartbeat(rt, job_id, owner)
    with job_context(job_id, claim.attempt, owner), hb:
        log.info("job %s claimed by %s (attempt %d)", job_id, owner, claim.attempt)
        try:
            outcome = _execute(rt, job_id, owner, hb, claim.resume_artifact_id)
            log.info("job %s %s", job_id, outcome)
            return outcome
        except LostOwnership:
            log.warning("job %s: another worker took it over; this run stops without writing", job_id)
            return "lost"
        except HandBack as back:
            _hand_back(rt, job_id, owner, back.attempt)
            return "handed back"
        except Exception as exc:  # noqa: BLE001 - every failure of the job must end in a recorded state
            if is_database_down(exc):
                # Not the job's fault: its message goes back to the queue and the job resumes from its
                # last checkpoint once the database answers (this process may claim it again).
                raise DatabaseUnavailable(f"job {job_id} stopped: the database is unreachable") from exc
            fail_job(rt, job_id, owner, exc)
            return "failed"


def _stop_unless_done(hooks: JobHooks, stopped: bool) -> None:
    """After the recipe returned: stop if another worker took over, hand back if this worker is
    shutting down (the recipe stopped at a checkpoint); else the job is finished as usual."""
    if hooks.hb.lost:
        raise LostOwnership(hooks.job_id)
    if stopped and hooks.handing_back:
        raise HandBack(hooks.job_id, attempt=hooks.attempt)


def _hand_back(rt: Runtime, job_id: str, owner: str, attempt: int) -> None:
    """Queue the job again for another worker; this run's attempt is given back (it was cut short
    by a shutdown, not by the job)."""
    from worker.celery_app import app

    def write() -> bool:
        with rt.session() as s:
            job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
            if job is None or job.worker_id != owner or job.status not in WORKER_STATES:
                return False
            job.status, job.worker_id, job.heartbeat_at = "queued", None, None
            job.attempt = min(job.attempt, attempt - 1)
            add_event(s, job_id, "status", f"job handed back: its worker {owner} is shutting down; the next "
                                           "worker resumes it from its last checkpoint",
                      {"status": "queued", "reason": "handed_back", "previous_worker": owner})
            s.commit()
            return True

    if retry_while_down(write, seconds=rt.settings.stale_heartbeat_seconds, what=f"hand-back of {job_id}"):
        try:
            enqueue_job(app, job_id)
        except Exception:  # the broker is down: the recovery sweep re-sends queued jobs
            log.exception("job %s handed back but not re-enqueued; the recovery sweep will send it", job_id)
        log.info("job %s handed back to the queue", job_id)


def _execute(rt: Runtime, job_id: str, owner: str, hb: Heartbeat, resume_artifact_id: str | None) -> str:
    """Run the job's recipe on this worker's device, or on several (worker/ddp.py), and finish it."""
    import torch

    with rt.session() as s:
        job = s.get(Job, job_id)
        devices = devices_for(rt.settings, job.type, job.config) if job is not None else 1
    if devices > 1:  # one process per device, started and supervised from here
        return run_distributed(rt, job_id, owner, hb, devices, resume_artifact_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.monotonic()
    setup = set_up_job(rt, job_id, owner, hb, resume_artifact_id)
    hooks = setup.hooks
    assert hooks is not None  # this process reports
    recipe_started = time.monotonic()
    if setup.job_type == "finetune":
        result = setup.finetune(hooks.as_hooks(), device=device)
        _stop_unless_done(hooks, result.stopped)
        recipe_seconds = time.monotonic() - recipe_started
        outcome = retry_while_down(lambda: finish_finetune(rt, hooks, result),
                                   seconds=rt.settings.stale_heartbeat_seconds, what=f"finishing job {job_id}")
    else:
        report = setup.evaluate(hooks.as_hooks(), device=device)
        _stop_unless_done(hooks, report.stopped)
        recipe_seconds = time.monotonic() - recipe_started
        outcome = retry_while_down(lambda: finish_evaluate(rt, hooks, report),
                                   seconds=rt.settings.stale_heartbeat_seconds, what=f"finishing job {job_id}")
    if outcome == "succeeded":   # the cost of its kind, for the next job's estimate (core.engine.estimate)
        record_job_timing(rt, job_id, setup, device, recipe_seconds,
                          time.monotonic() - started - recipe_seconds)
    return outcome
