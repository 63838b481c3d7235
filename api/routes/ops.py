"""Operations: /healthz (process alive), /readyz (database, broker, artifact store, workers), /metrics.

With API keys on, these answer without a key, but say only what a probe needs (docs/operations.md,
"What is public"): /readyz answers ready / not ready, and shows its checks (worker count, free
bytes, error texts) only to an API key or the operator token; /metrics (request and job counts of
every tenant) answers only to the operator token, ROBUSTIFY_OPERATOR_TOKEN, never to a tenant's key.
"""
from __future__ import annotations

import hmac
import shutil
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text

from api import responses as r
from api.deps import Services, ServicesDep
from api.errors import PROBLEM_JSON, ApiError, problem_response
from core.errors import ErrorCode
from core.service.apikeys import authenticate
from core.service.db import Job, WorkerHeartbeat, utcnow
from core.states import WORKER_STATES

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=r.Health, summary="The process is alive")
async def healthz() -> dict[str, str]:
    # async: answered on the event loop, so it needs no worker thread even when all are busy
    return {"status": "ok"}


def _check_database(svc: Services) -> dict[str, Any]:
    try:
        with svc.sessionmaker() as session:
            session.execute(text("SELECT 1"))
        return {"ok": True}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}


def _check_broker(svc: Services) -> dict[str, Any]:
    try:
        with svc.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
        return {"ok": True}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}


def _check_workers(svc: Services) -> dict[str, Any]:
    since = utcnow() - timedelta(seconds=svc.settings.stale_heartbeat_seconds)
    try:
        with svc.sessionmaker() as session:
            workers = session.scalar(select(func.count()).select_from(WorkerHeartbeat)
                                     .where(WorkerHeartbeat.heartbeat_at >= since)) or 0
            # A worker busy on a job also beats on the job row.
            busy = session.scalar(select(func.count()).select_from(Job).where(
                Job.heartbeat_at >= since, Job.status.in_(WORKER_STATES))) or 0
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    if workers or busy:
        return {"ok": True, "workers": int(workers)}
    return {"ok": False, "workers": 0,
            "error": f"no worker heartbeat in the last {svc.settings.stale_heartbeat_seconds:g} s; "
                     "start one with `robustify worker`."}


def _check_storage(svc: Services) -> dict[str, Any]:
    """Free space where the store keeps files on this machine's disk (a bucket reports none)."""
    root = getattr(svc.store, "root", None)
    if root is None:
        return {"ok": True, "free_bytes": None}
    try:
        usage = shutil.disk_usage(root)
    except OSError as exc:
        return {"ok": False, "error": f"the artifact store cannot be read: {exc.strerror or exc}"}
    free, required = usage.free, svc.settings.required_free_bytes(usage.total)
    if free < required:
        return {"ok": False, "free_bytes": free,
                "error": f"only {free} bytes free in the artifact store, below the {required} required "
                         "(ROBUSTIFY_MIN_FREE_BYTES, else ROBUSTIFY_MIN_FREE_FRACTION of the disk); free space "
                         "before uploads and checkpoints fail."}
    return {"ok": True, "free_bytes": free}


@router.get("/readyz", response_model=r.Readiness, response_model_exclude_unset=True,
            summary="Database, broker and artifact store reachable (with free space), workers seen",
            responses={503: {"description": "Not ready: `checks` says which part failed"}})
async def readyz(request: Request, svc: ServicesDep) -> Any:
    checks = {
        "database": await run_in_threadpool(_check_database, svc),
        "broker": await run_in_threadpool(_check_broker, svc),
        "artifacts": await run_in_threadpool(svc.store.check),
    }
    checks["workers"] = (await run_in_threadpool(_check_workers, svc)) if checks["database"]["ok"] else {
        "ok": False, "error": "unknown: the database is unreachable"}
    checks["storage"] = _check_storage(svc)
    failed = [name for name, c in checks.items() if not c["ok"]]
    if not await _may_see_details(request, svc):
        if failed:  # a probe needs the status only; which part failed is the operator's to see
            return problem_response(request, 503, ErrorCode.NOT_READY,
                                    "not ready; an API key or the operator token shows which check failed.")
        return {"status": "ready"}
    if failed:
        return problem_response(request, 503, ErrorCode.NOT_READY, f"not ready: {', '.join(failed)} failed.",
                                checks=checks)
    return {"status": "ready", "checks": checks}


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _is_operator(svc: Services, token: str | None) -> bool:
    expected = svc.settings.operator_token
    if not expected or token is None:
        return False  # no operator token set: nobody is the operator
    return hmac.compare_digest(token.encode(), expected.encode())


def _is_live_key(svc: Services, token: str) -> bool:
    with svc.sessionmaker() as session:
        return authenticate(session, token) is not None


async def _may_see_details(request: Request, svc: Services) -> bool:
    """Without keys everything is the local user's; with keys, a live API key or the operator token.
    A wrong or missing one is not an error here: the probe still gets its answer."""
    if not svc.auth.keys_required(request.scope):
        return True
    token = _bearer(request)
    if token is None:
        return False
    if _is_operator(svc, token):
        return True
    try:
        return await run_in_threadpool(_is_live_key, svc, token)
    except Exception:  # the database is down: /readyz is answering "not ready" anyway
        return False


_METRICS_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="robustify-operator"'}


@router.get("/metrics", summary="Prometheus metrics (the operator token when keys are on)", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string",
                                                                   "description": "Prometheus text format"}}}},
                       401: {"description": "Keys are on and the operator token (ROBUSTIFY_OPERATOR_TOKEN) is missing",
                             "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}})
def metrics(request: Request, svc: ServicesDep) -> Response:
    if svc.auth.keys_required(request.scope) and not _is_operator(svc, _bearer(request)):
        # request and job counts of every tenant: not for a tenant's key
        configured = svc.settings.operator_token is not None
        raise ApiError(401, ErrorCode.UNAUTHORIZED,
                       "/metrics needs the operator token: send `Authorization: Bearer <ROBUSTIFY_OPERATOR_TOKEN>` "
                       "(an API key is not enough)." if configured else
                       "/metrics is closed while API keys are on and no operator token is set: set "
                       "ROBUSTIFY_OPERATOR_TOKEN and send it as `Authorization: Bearer …`.",
                       headers=_METRICS_CHALLENGE)
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
