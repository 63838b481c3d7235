"""Sweep jobs: one fine-tune child per value, and the parent's ending once every child has ended.

A sweep (`type: "sweep"`) runs no recipe. The API writes it `running` together with its children,
ordinary fine-tunes that name it in `parent_job_id`, and enqueues each child as its own job, so the
children spread over the workers, can be cancelled one by one and resume after a lost worker like
any fine-tune. Nothing waits: the parent is settled

- when a child ends (the task that ran or refused the child calls `settle_parent_of`),
- when the sweep is cancelled (the API cancels its children and settles it), and
- as a safety net, by the recovery sweep (worker/sweep.py), which re-sends a running sweep whose
  children have all ended; the task then settles it instead of claiming it.

Settling locks the parent row: of two children that end together, one writes the frontier
(core/engine/recipes/frontier.py) and the other finds the sweep ended. Torch is never imported
here: the API imports this module.
"""
from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.engine.recipes.frontier import RecommendRule, frontier
from core.errors import ErrorCode
from core.service.db import Job, JobEvent, utcnow
from core.states import PARENT_TYPES, TERMINAL_STATES

log = logging.getLogger("robustify.worker")


def children_of(session: Session, sweep_id: str) -> list[Job]:
    """The sweep's fine-tunes, in the order of its values."""
    return list(session.scalars(select(Job).where(Job.parent_job_id == sweep_id)
                                .order_by(Job.created_at, Job.id)))


def _child_entry(child: Job) -> dict[str, Any]:
    values = (child.meta or {}).get("sweep_values") or {}
    return {"job_id": child.id, "status": child.status, "values": values,
            "delta": (child.threat_model or {}).get("delta"), "result": child.result}


SHARED_PARTS = ("before", "corrupted_images", "input_corruptions")


def shared_work(children: list[Job]) -> dict[str, Any]:
    """What the children took from the measurement cache (core.engine.cache) instead of measuring:
    per child, each part's reuse as its result's provenance.reused records it (None: not recorded,
    e.g. a child that did not finish), and how many children measured the input model themselves."""
    rows = []
    for child in children:
        reused = (((child.result or {}).get("provenance") or {}).get("reused")) or {}
        rows.append({"job_id": child.id, "values": (child.meta or {}).get("sweep_values") or {},
                     **{part: reused.get(part) for part in SHARED_PARTS},
                     "before_key": (reused.get("keys") or {}).get("before")})
    return {"children": rows, "input_model_measured": sum(1 for r in rows if r["before"] is False),
            "before_reused": sum(1 for r in rows if r["before"] is True),
            "corrupted_images_reused": sum(1 for r in rows if r["corrupted_images"] is True)}


def _event(session: Session, job_id: str, message: str, data: dict[str, Any], level: str = "info") -> None:
    session.add(JobEvent(job_id=job_id, type="status", level=level, message=message, data=data,
                         created_at=utcnow()))


def settle(session: Session, sweep_id: str) -> str | None:
    """Bring the sweep row up to date with its children (the caller holds a write transaction and
    commits): its progress while children run; once every child has ended, its frontier, its
    recommendation and its final status. Returns the sweep's status, None when there is no such sweep."""
    sweep = session.scalar(select(Job).where(Job.id == sweep_id).with_for_update())
    if sweep is None or sweep.type not in PARENT_TYPES:
        return None
    if sweep.status in TERMINAL_STATES:
        return sweep.status
    children = children_of(session, sweep_id)
    done = [c for c in children if c.status in TERMINAL_STATES]
    total = len(children)
    if len(done) < total:
        sweep.progress = {**(sweep.progress or {}), "fraction": len(done) / total if total else 0.0,
                          "phase": f"fine-tunes: {len(done)} of {total} ended"}
        return sweep.status
    rule = RecommendRule.model_validate((sweep.config or {}).get("recommend") or {})
    outcome = frontier([_child_entry(c) for c in children], rule)
    counts = {s: sum(1 for c in children if c.status == s) for s in ("succeeded", "failed", "cancelled")}
    sweep.result = {"type": "sweep", "children": [c.id for c in children], "counts": counts, **outcome,
                    "shared": shared_work(children)}
    now = utcnow()
    sweep.finished_at = now
    rec = outcome["recommendation"]
    if sweep.cancel_requested_at is not None:
        sweep.status = "cancelled"
        _event(session, sweep.id, f"sweep cancelled: {counts['succeeded']} of {total} fine-tunes had finished",
               {"status": "cancelled", "counts": counts})
    elif counts["succeeded"]:
        sweep.status = "succeeded"
        sweep.progress = {**(sweep.progress or {}), "fraction": 1.0, "phase": "done", "eta_seconds": 0.0}
        _event(session, sweep.id, f"sweep succeeded: {counts['succeeded']} of {total} fine-tunes finished; "
                                  f"recommended: {rec['job_id'] or 'none'} ({rec['reason']})",
               {"status": "succeeded", "counts": counts, "recommended_job_id": rec["job_id"]})
    else:
        first = next((c.error for c in children if c.error), None) or {}
        sweep.status = "failed"
        sweep.error = {"code": first.get("code") or ErrorCode.INTERNAL_ERROR,
                       "message": f"no fine-tune of the sweep succeeded ({counts['failed']} failed, "
                                  f"{counts['cancelled']} cancelled); the first error: "
                                  f"{first.get('message') or 'none recorded'}"}
        _event(session, sweep.id, "sweep failed: no fine-tune succeeded", {"status": "failed", "error": sweep.error},
               level="error")
    return sweep.status


def cancel_requested(session: Session, sweep: Job) -> None:
    """Mark a sweep as being cancelled (its children are cancelled by the caller); settle ends it."""
    if sweep.status in TERMINAL_STATES:
        return
    now = utcnow()
    sweep.cancel_requested_at = sweep.cancel_requested_at or now
    if sweep.status != "cancelling":
        sweep.status = "cancelling"
        _event(session, sweep.id, "cancellation requested: the sweep's fine-tunes are being cancelled",
               {"status": "cancelling"})


# ------------------------------------------------------------------------------ in the worker
def run_sweep_task(job_id: str) -> str | None:
    """The job task's first look: a sweep is settled, never claimed. None: `job_id` is no sweep."""
    from worker.claim import begin_write
    from worker.outage import DatabaseUnavailable, is_database_down
    from worker.runtime import runtime

    rt = runtime()
    try:
        with rt.session() as s:
            kind = s.scalar(select(Job.type).where(Job.id == job_id))
        if kind not in PARENT_TYPES:
            return None
        with rt.session() as s:
            begin_write(rt, s)
            status = settle(s, job_id)
            s.commit()
    except Exception as exc:
        if is_database_down(exc):   # the task gives its message back to the queue
            raise DatabaseUnavailable(f"job {job_id} could not be read: {type(exc).__name__}") from exc
        raise
    return f"sweep {status}"


def settle_parent_of(job_id: str) -> None:
    """After a task ran (or refused) a job: settle the sweep it belongs to, if any. A failure here
    is logged, not raised: the recovery sweep settles the parent later."""
    from worker.claim import begin_write
    from worker.runtime import runtime

    rt = runtime()
    try:
        with rt.session() as s:
            parent = s.scalar(select(Job.parent_job_id).where(Job.id == job_id))
        if parent is None:
            return
        with rt.session() as s:
            begin_write(rt, s)
            settle(s, parent)
            s.commit()
    except Exception:
        log.exception("could not settle the sweep of job %s; the recovery sweep will", job_id)
