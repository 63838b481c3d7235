"""Sweep jobs at the API: planning the children of a `type: "sweep"` submit, cancelling a sweep with
its children, and promoting a fine-tune's best checkpoint to a model (POST /v1/jobs/{id}/promote).

The sweep row and its children are written in one transaction by api/routes/jobs.py; the ending is
worker/sweepjob.py's (the frontier: core/engine/recipes/frontier.py).
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pydantic
from fastapi import APIRouter, Response
from fastapi.exceptions import RequestValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import responses as r
from api.crud import get_owned_job
from api.deps import CallerDep, SessionDep
from api.errors import ApiError
from api.schemas import JobCreate
from core.engine.config import FinetuneConfig
from core.engine.recipes.frontier import RecommendRule, check_rule_measured
from core.errors import ErrorCode
from core.service.db import Artifact, Job, JobEvent, Model, new_id, utcnow
from core.states import TERMINAL_STATES
from worker.sweepjob import cancel_requested, children_of, settle

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

Planned = list[tuple[dict[str, Any], dict[str, Any]]]   # (the child's swept values, its resolved config)


def _label(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def plan(body: JobCreate, resolve: Callable[[FinetuneConfig], pydantic.BaseModel]) -> Planned:
    """Each child's values and its fine-tune config: the body's config and threat_model with the
    values put in, validated (a bad combination is a 422 naming it) and resolved like a fine-tune's."""
    assert body.sweep is not None
    base = dict(body.config)
    threat = body.threat_model.model_dump() if body.threat_model is not None else dict(base.get("threat_model") or {})
    rule = body.recommend or RecommendRule()
    planned: Planned = []
    for i, values in enumerate(body.sweep.points()):
        merged = {**base, "threat_model": {**threat, **({"delta": values["delta"]} if "delta" in values else {})},
                  **{k: v for k, v in values.items() if k != "delta"}}
        if body.seed is not None:
            merged["seed"] = body.seed
        try:
            cfg = FinetuneConfig.model_validate(merged)
        except pydantic.ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", "sweep", i, *e["loc"]),
                                           "msg": f"the fine-tune with {_label(values)}: {e['msg']}"}
                                          for e in exc.errors()]) from None
        problem = check_rule_measured(rule, cfg.threat_model.kind)
        if problem:
            raise ApiError(422, ErrorCode.VALIDATION_ERROR, problem,
                           errors=[{"loc": ["body", "recommend", "maximize"], "field": "recommend.maximize",
                                    "msg": problem, "type": "value_error"}])
        planned.append((values, resolve(cfg).model_dump(mode="json")))
    return planned


def parent_config(config: dict[str, Any], body: JobCreate) -> dict[str, Any]:
    """The sweep row's config: the children's common recipe, the values and the rule."""
    assert body.sweep is not None
    return {**config, "sweep": body.sweep.model_dump(mode="json", exclude_none=True),
            "recommend": (body.recommend or RecommendRule()).model_dump(mode="json")}


def add_children(session: Session, sweep: Job, planned: Planned) -> list[Job]:
    """The sweep's fine-tunes, queued (the caller commits and enqueues them)."""
    children = []
    now = utcnow()
    for i, (values, config) in enumerate(planned):
        child = Job(id=new_id("job"), owner_key_id=sweep.owner_key_id, type="finetune", status="queued",
                    model_id=sweep.model_id, dataset=sweep.dataset, threat_model=config["threat_model"],
                    config=config, seed=config["seed"], meta={**(sweep.meta or {}), "sweep_values": values},
                    attempt=0, max_attempts=sweep.max_attempts, parent_job_id=sweep.id,
                    created_at=now + timedelta(microseconds=i + 1))   # children_of lists them in the values' order
        session.add(child)
        session.add(JobEvent(job_id=child.id, type="status", message=f"job queued by sweep {sweep.id} "
                             f"({_label(values)})", data={"status": "queued", "parent_job_id": sweep.id}))
        children.append(child)
    sweep.status, sweep.started_at = "running", now
    sweep.progress = {"fraction": 0.0, "phase": f"fine-tunes: 0 of {len(children)} ended"}
    session.add(JobEvent(job_id=sweep.id, type="status", message=f"sweep started: {len(children)} fine-tunes queued",
                         data={"status": "running", "children": [c.id for c in children]}))
    return children


def cancel_sweep(session: Session, sweep: Job, cancel_one: Callable[[Job], None]) -> None:
    """Cancel every live child (as a cancel of each would) and end the sweep once they have ended."""
    cancel_requested(session, sweep)
    for child in children_of(session, sweep.id):
        if child.status not in TERMINAL_STATES:
            locked = session.scalar(select(Job).where(Job.id == child.id).with_for_update())
            if locked is not None:
                cancel_one(locked)
    settle(session, sweep.id)


# ------------------------------------------------------------------------------- promote
@router.post("/{job_id}/promote", response_model=r.Model, summary="Promote a fine-tune's best checkpoint to a model",
             responses={201: {"description": "registered now", "model": r.Model}})
def promote(job_id: str, response: Response, who: CallerDep, session: SessionDep) -> r.Model:
    """The model of a succeeded fine-tune's best checkpoint (a sweep's child, say), registered now if
    it has none: an improved fine-tune registered its checkpoint already (200, that model); one that
    handed back the input model answers with the input model; a model since deleted is registered
    again from the checkpoint (201)."""
    from worker.chain import register_finetuned_model

    job = get_owned_job(session, who, job_id)
    if job.type != "finetune" or job.status != "succeeded":
        raise ApiError(409, ErrorCode.CONFLICT, f"job {job.id} is a {job.status} {job.type}; only a succeeded "
                       "fine-tune has a best checkpoint to promote.", job_status=job.status)
    existing = (job.result or {}).get("model_id")
    model = session.get(Model, existing) if existing else None
    if model is None or model.deleted_at is not None:
        best_id = (job.result or {}).get("best_checkpoint_id")
        best = session.get(Artifact, best_id) if best_id else None
        if best is None or best.job_id != job.id:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"job {job.id} has no best checkpoint to promote.")
        model = register_finetuned_model(session, job, best)
        job.result = {**(job.result or {}), "model_id": model.id}
        session.add(JobEvent(job_id=job.id, type="model", message=f"promoted the best checkpoint to model {model.id}",
                             data={"model_id": model.id, "checkpoint_id": best.id}))
        session.commit()
        response.status_code = 201
    weights = session.get(Artifact, model.weights_artifact_id) if model.weights_artifact_id else None
    return r.Model.from_row(model, weights)
