"""/v1/jobs: submit, list, get, cancel; events (JSON or Server-Sent Events); checkpoints, report."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import pydantic
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import WithJsonSchema
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from api import responses as r
from api.admission import check_devices, check_queued_share, check_train_size
from api.bodies import check_metadata
from api.compatibility import DatasetFacts, check_compatible, dataset_facts
from api.crud import get_owned_job, get_owned_model, owned
from api.deps import Caller, CallerDep, Services, ServicesDep, SessionDep
from api.errors import ApiError, not_found
from api.estimates import job_estimate, stored_estimate
from api.routes import sweeps
from api.routes.common import BINARY, IdFilter, PageAfter, PageLimit, artifact_download, paginate
from api.routes.models import register_robustbench_model
from api.routes.webhooks import job_webhook
from api.schemas import JobCreate, RobustBenchModelCreate, RobustBenchRef
from api.tenants import hold_until_response_ends, shares
from core.engine.architecture_names import robustbench_architecture
from core.engine.config import EvaluateConfig, FinetuneConfig
from core.engine.defaults import resolve_finetune
from core.errors import ErrorCode
from core.limits import MAX_EVENT_ID
from core.service.db import Artifact, Job, JobEvent, Model, new_id, utcnow
from core.service.queue import enqueue_job
from core.states import JOB_STATES, PARENT_TYPES, TERMINAL_STATES, JobType

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

CONFIGS: dict[str, type[pydantic.BaseModel]] = {"finetune": FinetuneConfig, "evaluate": EvaluateConfig,
                                                "sweep": FinetuneConfig}   # a sweep: its children's recipe


# ------------------------------------------------------------------------------- submit
def _recipe_config(body: JobCreate) -> pydantic.BaseModel:
    """The recipe config with the top-level threat_model and seed merged in (they win)."""
    merged = dict(body.config)
    if body.threat_model is not None:
        merged["threat_model"] = body.threat_model.model_dump()
    if body.seed is not None:
        merged["seed"] = body.seed
    try:
        return CONFIGS[body.type].model_validate(merged)
    except pydantic.ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", "config", *e["loc"])} for e in exc.errors()]) from None


def _resolve_model(session: Session, svc: Services, who: Caller, body: JobCreate) -> Model:
    if body.model_id is not None:
        m = get_owned_model(session, who, body.model_id)
    else:
        m = _robustbench_model(session, svc, who, body.model.robustbench)  # type: ignore[union-attr]
    if m.status != "ready":
        why = f" ({m.error.get('message')})" if m.status == "rejected" and m.error else ""
        raise ApiError(409, ErrorCode.MODEL_NOT_READY,
                       f"model {m.id} is {m.status}{why}; a job needs a ready model"
                       + (": retry once its validation has finished." if m.status == "validating" else "."),
                       model_id=m.id, model_status=m.status)
    return m


def _robustbench_model(session: Session, svc: Services, who: Caller, ref: RobustBenchRef) -> Model:
    """An inline RobustBench reference reuses this key's registration, or registers it now."""
    m = session.scalar(select(Model).where(
        owned(Model.owner_key_id, who), Model.deleted_at.is_(None),
        Model.architecture == robustbench_architecture(ref.name), Model.dataset == ref.dataset,
        Model.threat_model == ref.threat_model, Model.status != "rejected",
    ).order_by(Model.created_at.desc()).limit(1))
    if m is not None:
        return m
    return register_robustbench_model(svc, session, who,
                                      RobustBenchModelCreate(source="robustbench", **ref.model_dump()))


def _resolved(cfg: pydantic.BaseModel, facts: DatasetFacts) -> pydantic.BaseModel:
    """A fine-tune's "auto" fields filled in from the training-set size, so that the job stores
    and shows the values it will run with (core.engine.defaults)."""
    if not isinstance(cfg, FinetuneConfig):
        return cfg
    available = facts.train_examples if cfg.train_examples is None else min(cfg.train_examples, facts.train_examples)
    return resolve_finetune(cfg, available)


def _same_request(job: Job, body: JobCreate, model_id: str, config: dict[str, Any]) -> bool:
    return (job.type == body.type and job.model_id == model_id and job.dataset == body.dataset
            and job.config == config and (job.meta or None) == (body.metadata or None))


@router.post("", status_code=202, response_model=r.Job, summary="Submit a fine-tuning, evaluation or sweep job")
def create_job(body: JobCreate, response: Response, svc: ServicesDep, who: CallerDep, session: SessionDep,
               idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> r.Job:
    check_metadata(body.metadata, svc.settings)
    cfg = _recipe_config(body)
    facts = dataset_facts(session, who, body.dataset)
    if isinstance(cfg, FinetuneConfig):
        check_train_size(facts)
    config = _resolved(cfg, facts).model_dump(mode="json")
    planned = sweeps.plan(body, lambda c: _resolved(c, facts)) if body.type == "sweep" else []
    if planned:
        config = sweeps.parent_config(config, body)
    if idempotency_key:
        prior = session.scalar(select(Job).where(owned(Job.owner_key_id, who), Job.idempotency_key == idempotency_key))
        if prior is not None:
            return _replay(session, prior, body, config, response)
    check_queued_share(session, who, svc.settings, adding=len(planned) or 1)
    check_devices(session, svc.settings, config.get("devices"))
    m = _resolve_model(session, svc, who, body)
    check_compatible(m, facts)
    webhook_endpoint_id, webhook_events = job_webhook(session, svc, who, body.webhook)
    estimate = job_estimate(session, svc.settings, who, body.type, config, m, facts)

    job = Job(
        id=new_id("job"), owner_key_id=who.key_id, type=body.type, status="queued", model_id=m.id,
        dataset=body.dataset, threat_model=config["threat_model"], config=config, seed=config["seed"],
        meta=body.metadata, idempotency_key=idempotency_key, attempt=0,
        max_attempts=svc.settings.max_attempts, created_at=utcnow(),
        webhook_endpoint_id=webhook_endpoint_id, webhook_events=webhook_events,
    )
    try:
        session.add(job)
        session.flush()  # the unique indexes on the key fire here (or at commit)
        session.add(JobEvent(job_id=job.id, type="status", message="job queued",
                             data={"status": "queued", "estimate": estimate}))
        children = sweeps.add_children(session, job, planned) if planned else []
        session.commit()
    except IntegrityError:  # a concurrent retry with the same Idempotency-Key won the race
        session.rollback()
        prior = session.scalar(select(Job).where(owned(Job.owner_key_id, who), Job.idempotency_key == idempotency_key))
        if prior is None:
            raise
        return _replay(session, prior, body, config, response)

    # Only after the row is committed: a worker that picks the message up must find it. A sweep's
    # children are the jobs that run (worker/sweepjob.py).
    try:
        for queued in children or [job]:
            enqueue_job(svc.celery, queued.id)
    except Exception as exc:
        error = {"code": ErrorCode.BROKER_UNAVAILABLE,
                 "message": f"the job could not be queued ({type(exc).__name__}: {exc}); "
                            "check the broker (ROBUSTIFY_BROKER_URL) and submit again."}
        for row in [job, *children]:
            row.status, row.finished_at, row.error = "failed", utcnow(), error
            session.add(JobEvent(job_id=row.id, type="status", level="error", message="job could not be queued",
                                 data={"status": "failed", "error": error}))
        session.commit()
        raise ApiError(503, ErrorCode.BROKER_UNAVAILABLE, error["message"], job_id=job.id) from None
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return r.Job.from_row(job, estimate)


def _replay(session: Session, prior: Job, body: JobCreate, config: dict[str, Any], response: Response) -> r.Job:
    model_id = body.model_id or prior.model_id
    if not _same_request(prior, body, model_id, config):
        raise ApiError(409, ErrorCode.CONFLICT, "this Idempotency-Key was already used for a different request; "
                                        "use a new key for a new job.", job_id=prior.id)
    response.headers["Location"] = f"/v1/jobs/{prior.id}"
    response.headers["Idempotent-Replayed"] = "true"
    return r.Job.from_row(prior, stored_estimate(session, prior.id))


# ------------------------------------------------------------------------------- read
_STATUS_LIST = f"^({'|'.join(JOB_STATES)})(,({'|'.join(JOB_STATES)}))*$"
StatusFilter = Annotated[str | None, Query(pattern=_STATUS_LIST, description="Comma-separated states.")]


@router.get("", response_model=r.JobList, summary="List jobs, newest first")
def list_jobs(who: CallerDep, session: SessionDep, status: StatusFilter = None, type: JobType | None = None,
              model_id: IdFilter = None, parent_job_id: IdFilter = None, limit: PageLimit = 20,
              after: PageAfter = None) -> r.JobList:
    mine = owned(Job.owner_key_id, who)
    stmt = select(Job).where(mine)
    if status:
        stmt = stmt.where(Job.status.in_(status.split(",")))
    if type:
        stmt = stmt.where(Job.type == type)
    if model_id:
        stmt = stmt.where(Job.model_id == model_id)
    if parent_job_id:   # a sweep's fine-tunes
        stmt = stmt.where(Job.parent_job_id == parent_job_id)
    rows, more = paginate(session, stmt, Job, after, limit, after_filter=mine)
    return r.JobList.page([r.Job.from_row(j) for j in rows], more)


@router.get("/{job_id}", response_model=r.Job, summary="Get a job")
def get_job(job_id: str, who: CallerDep, session: SessionDep) -> r.Job:
    return r.Job.from_row(get_owned_job(session, who, job_id), stored_estimate(session, job_id))


@router.post("/{job_id}/cancel", response_model=r.Job, summary="Cancel a job (idempotent)")
def cancel_job(job_id: str, who: CallerDep, session: SessionDep) -> r.Job:
    get_owned_job(session, who, job_id)
    # Lock the row: a worker claiming the job at the same moment must see one consistent state.
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
    assert job is not None
    if job.type in PARENT_TYPES:   # a sweep: its children, then itself once they have ended
        sweeps.cancel_sweep(session, job, lambda child: _cancel(session, child))
    else:
        _cancel(session, job)
    session.commit()
    return r.Job.from_row(job)


def _cancel(session: Session, job: Job) -> None:
    now = utcnow()
    if job.status == "queued":
        job.status, job.cancel_requested_at, job.finished_at = "cancelled", now, now
        session.add(JobEvent(job_id=job.id, type="status", message="job cancelled before it started",
                             data={"status": "cancelled"}))
    elif job.status == "running":
        job.status, job.cancel_requested_at = "cancelling", now
        session.add(JobEvent(job_id=job.id, type="status", data={"status": "cancelling"},
                             message="cancellation requested; the worker stops at its next check"))


# ------------------------------------------------------------------------------- events
def _events_after(session: Session, job_id: str, after: int, limit: int) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                                .order_by(JobEvent.id).limit(limit)))


_EVENT_ID = r"^[0-9]{1,19}$"   # an event id as a Last-Event-ID header carries it
# A header is a string or absent, never null: the schema says so (pydantic would add null).
LastEventId = Annotated[str | None, Header(pattern=_EVENT_ID, description="Resume a stream after this event id."),
                        WithJsonSchema({"type": "string", "pattern": _EVENT_ID,
                                        "description": "Resume a stream after this event id."})]


@router.get("/{job_id}/events", response_model=r.EventList, summary="Job events (JSON, or a Server-Sent Events stream)",
            responses={200: {"content": {"text/event-stream": {"schema": {
                "type": "string",
                "description": "Server-Sent Events: `id`, `event` (the event type), `data` (an Event)"}}}}})
def job_events(job_id: str, request: Request, svc: ServicesDep, who: CallerDep, session: SessionDep,
               after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID)] = 0,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               last_event_id: LastEventId = None) -> Any:
    job = get_owned_job(session, who, job_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        start = max(after, _event_id(last_event_id))  # checked before the stream starts, never inside it
        # The key's own share of the streams (429 beyond it), given back when the response ends
        # however it ends: the stream outlives this function (api/tenants.py).
        hold_until_response_ends(request.scope, shares(request).streams.take(who.key_id))
        session.close()  # the stream polls with short sessions of its own; hold no connection
        return StreamingResponse(
            _sse(request, svc, job.id, start), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    rows = _events_after(session, job.id, after, limit + 1)
    return r.EventList.page([r.Event.from_row(e) for e in rows[:limit]], len(rows) > limit)


def _event_id(header: str | None) -> int:
    if header is None:
        return 0
    if int(header) > MAX_EVENT_ID:
        raise ApiError(422, ErrorCode.VALIDATION_ERROR, f"Last-Event-ID {header} is not an event id of this API "
                       f"(ids are at most {MAX_EVENT_ID}); reconnect without it or with an id it sent.",
                       errors=[{"loc": ["header", "last-event-id"], "field": "last-event-id",
                                "msg": "out of range", "type": "less_than_equal"}])
    return int(header)


def _poll(svc: Services, job_id: str, after: int) -> tuple[str | None, list[dict[str, Any]]]:
    with svc.sessionmaker() as session:
        # Status first, then events: an event written before the job turned terminal is seen.
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        return status, [r.Event.from_row(e).model_dump(mode="json") for e in _events_after(session, job_id, after, 500)]


async def _sse(request: Request, svc: Services, job_id: str, after: int) -> AsyncIterator[str]:
    poll = svc.settings.sse_poll_seconds
    keepalive = svc.settings.sse_keepalive_seconds
    last_sent = time.monotonic()
    yield f"retry: {int(max(poll, 1.0) * 1000)}\n\n"
    while not svc.shutting_down.is_set():
        try:
            status, events = await run_in_threadpool(_poll, svc, job_id, after)
        except SQLAlchemyError:
            # End the stream cleanly; the client reconnects after `retry` with Last-Event-ID.
            yield ": the database is unreachable; reconnect to resume\n\n"
            return
        for ev in events:
            after = ev["id"]
            yield f"id: {ev['id']}\nevent: {ev['type']}\ndata: {json.dumps(ev, separators=(',', ':'))}\n\n"
            last_sent = time.monotonic()
        if len(events) == 500:
            continue  # more are waiting
        if status is None or status in TERMINAL_STATES:
            return
        if await request.is_disconnected():
            return
        if time.monotonic() - last_sent >= keepalive:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(poll)


# ------------------------------------------------------------------------------- artifacts
def _checkpoints(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "checkpoint")
                                .order_by(Artifact.created_at, Artifact.id)))


@router.get("/{job_id}/checkpoints", response_model=r.CheckpointList, summary="The job's checkpoints")
def list_checkpoints(job_id: str, who: CallerDep, session: SessionDep) -> r.CheckpointList:
    job = get_owned_job(session, who, job_id)
    return r.CheckpointList.page([r.Checkpoint.from_row(a) for a in _checkpoints(session, job.id)])


@router.get("/{job_id}/checkpoints/{checkpoint_id}/content", summary="Download a checkpoint (safetensors)",
            response_class=Response,
            responses={200: {"content": {"application/octet-stream": BINARY}}, 304: {"description": "Not modified"}})
def checkpoint_content(job_id: str, checkpoint_id: str, request: Request, svc: ServicesDep, who: CallerDep,
                       session: SessionDep) -> Response:
    job = get_owned_job(session, who, job_id)
    art = session.scalar(select(Artifact).where(Artifact.id == checkpoint_id, Artifact.job_id == job.id,
                                                Artifact.kind == "checkpoint"))
    if art is None:
        raise not_found("checkpoint", checkpoint_id)
    return artifact_download(request, svc.store, art)


def best_checkpoint(session: Session, job: Job) -> Artifact | None:
    best_id = (job.result or {}).get("best_checkpoint_id")
    if best_id:
        art = session.get(Artifact, best_id)
        if art is not None and art.job_id == job.id:
            return art
    return session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == "checkpoint",
                                                 Artifact.is_best.is_(True))
                          .order_by(Artifact.created_at.desc(), Artifact.id.desc()).limit(1))


@router.get("/{job_id}/checkpoint", summary="Download the job's best checkpoint (safetensors)",
            response_class=Response, responses={200: {"content": {"application/octet-stream": BINARY}}})
def job_checkpoint(job_id: str, request: Request, svc: ServicesDep, who: CallerDep, session: SessionDep) -> Response:
    job = get_owned_job(session, who, job_id)
    art = best_checkpoint(session, job)
    if art is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"job {job.id} has no checkpoint yet (status {job.status}); "
                                         "one is stored after each epoch of a fine-tune.", job_status=job.status)
    return artifact_download(request, svc.store, art)


def _single(session: Session, job: Job, kind: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == kind)
                          .order_by(Artifact.created_at.desc(), Artifact.id.desc()).limit(1))


@router.get("/{job_id}/report", response_model=r.Report, summary="The job's report (JSON)")
def job_report(job_id: str, request: Request, svc: ServicesDep, who: CallerDep, session: SessionDep) -> Response:
    job = get_owned_job(session, who, job_id)
    art = _single(session, job, "report")
    if art is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"job {job.id} has no report yet (status {job.status}); "
                                         "it is written when the job succeeds.", job_status=job.status)
    return artifact_download(request, svc.store, art)


@router.get("/{job_id}/report.png", summary="Robust accuracy plot (PNG)",
            response_class=Response, responses={200: {"content": {"image/png": BINARY}}})
def job_plot(job_id: str, request: Request, svc: ServicesDep, who: CallerDep, session: SessionDep) -> Response:
    job = get_owned_job(session, who, job_id)
    art = _single(session, job, "plot")
    if art is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"job {job.id} has no plot yet (status {job.status}).",
                       job_status=job.status)
    return artifact_download(request, svc.store, art)

