"""/v1/webhooks: the endpoints that receive a job's signed webhooks; a job's delivery attempts.

An endpoint belongs to the API key that registered it and has its own signing secret. A job
names a URL (registered on first use) or falls back to the key's default endpoint; which
events are sent, the signing and the retries are core/service/webhooks.py and worker/webhooks.py.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.deps import Caller, Services, caller, db_session, owned, services
from api.errors import not_found
from api import responses as r
from api.routes.common import ID_PATTERN, MAX_PAGE, paginate
from api.schemas import JobWebhook, WebhookEndpointCreate, page, webhook_delivery_object, webhook_endpoint_object
from core.service.db import WebhookDelivery, WebhookEndpoint, new_id, utcnow
from core.service.webhooks import check_target, new_secret, policy_of

router = APIRouter(tags=["webhooks"])


def _live(who: Caller) -> list[Any]:
    return [owned(WebhookEndpoint.owner_key_id, who), WebhookEndpoint.deleted_at.is_(None)]


def _register(session: Session, svc: Services, who: Caller, url: str, events: list[str] | None,
              default: bool = False, description: str | None = None) -> WebhookEndpoint:
    check_target(url, policy_of(svc.settings))
    if default:  # one default endpoint per key
        session.execute(update(WebhookEndpoint).where(*_live(who), WebhookEndpoint.is_default.is_(True))
                        .values(is_default=False))
    endpoint = WebhookEndpoint(id=new_id("whk"), owner_key_id=who.key_id, url=url, secret=new_secret(),
                               events=events, is_default=default, description=description, created_at=utcnow())
    session.add(endpoint)
    session.flush()
    return endpoint


def job_webhook(session: Session, svc: Services, who: Caller, spec: JobWebhook | None
                ) -> tuple[str | None, list[str] | None]:
    """(endpoint id, event filter) for a new job: the URL it names (registered on first use, so it
    gets a secret of its own), else the caller's default endpoint, else none."""
    if spec is None:
        default = session.scalar(select(WebhookEndpoint).where(*_live(who), WebhookEndpoint.is_default.is_(True))
                                 .limit(1))
        return (default.id, default.events) if default is not None else (None, None)
    endpoint = session.scalar(select(WebhookEndpoint).where(*_live(who), WebhookEndpoint.url == spec.url)
                              .order_by(WebhookEndpoint.created_at.desc()).limit(1))
    if endpoint is None:
        endpoint = _register(session, svc, who, spec.url, None)
    else:
        check_target(endpoint.url, policy_of(svc.settings))
    events = list(spec.events) if spec.events else endpoint.events
    return endpoint.id, events


def _get_endpoint(session: Session, who: Caller, endpoint_id: str) -> WebhookEndpoint:
    endpoint = session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id, *_live(who)))
    if endpoint is None:
        raise not_found("webhook endpoint", endpoint_id)
    return endpoint


@router.post("/v1/webhooks", status_code=201, response_model=r.WebhookEndpoint, summary="Register a webhook endpoint (returns its signing secret)")
def create_endpoint(body: WebhookEndpointCreate, svc: Services = Depends(services), who: Caller = Depends(caller),
                    session: Session = Depends(db_session)) -> dict[str, Any]:
    endpoint = _register(session, svc, who, body.url, list(body.events) if body.events else None,
                         body.default, body.description)
    session.commit()
    return webhook_endpoint_object(endpoint)


@router.get("/v1/webhooks", response_model=r.WebhookEndpointList, summary="List webhook endpoints")
def list_endpoints(limit: int = Query(20, ge=1, le=MAX_PAGE), after: str | None = Query(None, pattern=ID_PATTERN),
                   who: Caller = Depends(caller), session: Session = Depends(db_session)) -> dict[str, Any]:
    live = _live(who)
    rows, more = paginate(session, select(WebhookEndpoint).where(*live), WebhookEndpoint, after, limit,
                          after_filter=live[0])
    return page([webhook_endpoint_object(e) for e in rows], more)


@router.get("/v1/webhooks/{endpoint_id}", response_model=r.WebhookEndpoint, summary="Get a webhook endpoint")
def get_endpoint(endpoint_id: str, who: Caller = Depends(caller), session: Session = Depends(db_session)) -> dict[str, Any]:
    return webhook_endpoint_object(_get_endpoint(session, who, endpoint_id))


@router.delete("/v1/webhooks/{endpoint_id}", response_model=r.Deleted, summary="Delete a webhook endpoint (its pending deliveries stop)")
def delete_endpoint(endpoint_id: str, who: Caller = Depends(caller), session: Session = Depends(db_session)) -> dict[str, Any]:
    endpoint = _get_endpoint(session, who, endpoint_id)
    endpoint.deleted_at, endpoint.is_default = utcnow(), False  # kept: past deliveries refer to it
    session.commit()
    return {"id": endpoint.id, "object": "webhook_endpoint", "deleted": True}


@router.get("/v1/jobs/{job_id}/webhook-deliveries", tags=["jobs"], response_model=r.WebhookDeliveryList,
            summary="The job's webhook deliveries and their attempts")
def job_deliveries(job_id: str, who: Caller = Depends(caller), session: Session = Depends(db_session)) -> dict[str, Any]:
    from api.routes.jobs import get_owned_job

    job = get_owned_job(session, who, job_id)
    rows = list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job.id)
                                .order_by(WebhookDelivery.created_at, WebhookDelivery.id)))
    items = [webhook_delivery_object(d) for d in rows]
    return {"object": "list", "data": items, "has_more": False, "last_id": items[-1]["id"] if items else None}
