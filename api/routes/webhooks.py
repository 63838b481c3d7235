"""/v1/webhooks: the endpoints that receive a job's signed webhooks; a job's delivery attempts.

An endpoint belongs to the API key that registered it and has its own signing secret. A job
names a URL (registered on first use) or falls back to the key's default endpoint; which
events are sent, the signing and the retries are core/service/webhooks.py and worker/webhooks.py.
"""
from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api import responses as r
from api.crud import get_owned_endpoint, get_owned_job, live_endpoints
from api.deps import Caller, CallerDep, Services, ServicesDep, SessionDep
from api.routes.common import PageAfter, PageLimit, paginate
from api.schemas import JobWebhook, WebhookEndpointCreate
from core.service.db import WebhookDelivery, WebhookEndpoint, new_id, utcnow
from core.service.webhooks import check_target, new_secret, policy_of

router = APIRouter(tags=["webhooks"])


def _register(session: Session, svc: Services, who: Caller, url: str, events: list[str] | None,
              default: bool = False, description: str | None = None) -> WebhookEndpoint:
    check_target(url, policy_of(svc.settings))
    if default:  # one default endpoint per key
        session.execute(update(WebhookEndpoint).where(*live_endpoints(who), WebhookEndpoint.is_default.is_(True))
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
        default = session.scalar(select(WebhookEndpoint)
                                 .where(*live_endpoints(who), WebhookEndpoint.is_default.is_(True)).limit(1))
        return (default.id, default.events) if default is not None else (None, None)
    endpoint = session.scalar(select(WebhookEndpoint).where(*live_endpoints(who), WebhookEndpoint.url == spec.url)
                              .order_by(WebhookEndpoint.created_at.desc()).limit(1))
    if endpoint is None:
        endpoint = _register(session, svc, who, spec.url, None)
    else:
        check_target(endpoint.url, policy_of(svc.settings))
    events = list(spec.events) if spec.events else endpoint.events
    return endpoint.id, events


@router.post("/v1/webhooks", status_code=201, response_model=r.WebhookEndpoint,
             summary="Register a webhook endpoint (returns its signing secret)")
def create_endpoint(body: WebhookEndpointCreate, svc: ServicesDep, who: CallerDep,
                    session: SessionDep) -> r.WebhookEndpoint:
    endpoint = _register(session, svc, who, body.url, list(body.events) if body.events else None,
                         body.default, body.description)
    session.commit()
    return r.WebhookEndpoint.from_row(endpoint)


@router.get("/v1/webhooks", response_model=r.WebhookEndpointList, summary="List webhook endpoints")
def list_endpoints(who: CallerDep, session: SessionDep, limit: PageLimit = 20,
                   after: PageAfter = None) -> r.WebhookEndpointList:
    live = live_endpoints(who)
    rows, more = paginate(session, select(WebhookEndpoint).where(*live), WebhookEndpoint, after, limit,
                          after_filter=live[0])
    return r.WebhookEndpointList.page([r.WebhookEndpoint.from_row(e) for e in rows], more)


@router.get("/v1/webhooks/{endpoint_id}", response_model=r.WebhookEndpoint, summary="Get a webhook endpoint")
def get_endpoint(endpoint_id: str, who: CallerDep, session: SessionDep) -> r.WebhookEndpoint:
    return r.WebhookEndpoint.from_row(get_owned_endpoint(session, who, endpoint_id))


@router.delete("/v1/webhooks/{endpoint_id}", response_model=r.Deleted,
               summary="Delete a webhook endpoint (its pending deliveries stop)")
def delete_endpoint(endpoint_id: str, who: CallerDep, session: SessionDep) -> r.Deleted:
    endpoint = get_owned_endpoint(session, who, endpoint_id)
    endpoint.deleted_at, endpoint.is_default = utcnow(), False  # kept: past deliveries refer to it
    session.commit()
    return r.Deleted(id=endpoint.id, object="webhook_endpoint", deleted=True)


@router.get("/v1/jobs/{job_id}/webhook-deliveries", tags=["jobs"], response_model=r.WebhookDeliveryList,
            summary="The job's webhook deliveries and their attempts")
def job_deliveries(job_id: str, who: CallerDep, session: SessionDep) -> r.WebhookDeliveryList:
    job = get_owned_job(session, who, job_id)
    rows = list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job.id)
                                .order_by(WebhookDelivery.created_at, WebhookDelivery.id)))
    return r.WebhookDeliveryList.page([r.WebhookDelivery.from_row(d) for d in rows])
