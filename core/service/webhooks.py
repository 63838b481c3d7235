"""Webhooks: which job events are sent, the message body, the transactional outbox, target checks.

A job's status changes and per-epoch metrics are already recorded as job events (the
`job_events` table). `install_outbox` makes every session that writes such an event also
write a `webhook_deliveries` row in the same flush, when the job has a webhook that listens to
that event type: the message exists exactly when the change is committed, whichever process
made it (API, worker, recovery), and it survives restarts. The worker's dispatcher
(worker/webhooks.py) sends it, signed as Standard Webhooks asks, and retries with backoff.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import logging
import re
import secrets
import socket
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ErrorCode, RobustifyError
from core.service.db import Job, JobEvent, WebhookDelivery, utcnow
from core.service.netpolicy import TargetPolicy, target_policy
from core.service.settings import get_settings

log = logging.getLogger("robustify.webhooks")

WebhookEventType = Literal["job.started", "job.progress", "job.succeeded", "job.failed", "job.cancelled"]
WEBHOOK_EVENT_TYPES: tuple[str, ...] = get_args(WebhookEventType)

# job_events status values that are webhook events (queued and cancelling are not)
_STATUS_EVENTS: dict[str | None, str] = {"running": "job.started", "succeeded": "job.succeeded", "failed": "job.failed",
                                         "cancelled": "job.cancelled"}


class WebhookTargetRefused(RobustifyError):
    code = ErrorCode.WEBHOOK_TARGET_FORBIDDEN
    status = 422


class WebhookTargetUnresolvable(RobustifyError):
    code = ErrorCode.WEBHOOK_TARGET_UNRESOLVABLE
    status = 422


def new_secret() -> str:
    """A signing secret as Standard Webhooks serialises it: whsec_ + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def new_message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


# ------------------------------------------------------------------------------ targets
# What the request schemas state about a webhook URL (JSON Schema regex; url_problem checks the rest).
WEBHOOK_URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s/?#]+([/?#]\S*)?$"


def url_problem(url: str) -> str | None:
    """What makes `url` unusable as a webhook URL whatever its host resolves to, or None."""
    parts = urlsplit(url)
    if not re.fullmatch(WEBHOOK_URL_PATTERN, url) or parts.scheme not in ("http", "https") or not parts.hostname:
        return f"webhook URL {url!r} must be an absolute http:// or https:// URL."
    if parts.username or parts.password:
        return "a webhook URL must not carry credentials; verify the signature instead."
    try:
        _ = parts.port  # reading it parses the port
    except ValueError:
        return f"webhook URL {url!r} has an invalid port."
    return None


def policy_of(settings: Any) -> TargetPolicy:
    """The webhook target policy of these settings (core/service/netpolicy.py)."""
    return target_policy(settings.webhook_allow_networks, settings.webhook_allow_private,
                         settings.resolved_database_url, settings.resolved_broker_url)


def check_target(url: str, policy: TargetPolicy) -> None:
    """Refuse a webhook URL that is not http(s), or any of whose host's addresses the policy
    refuses: not globally routable and outside ROBUSTIFY_WEBHOOK_ALLOW_NETWORKS, a metadata
    address, or this service's own database or broker.

    The dispatcher checks again before each attempt, so a name that later resolves inwards
    (DNS rebinding) is refused too."""
    problem = url_problem(url)
    if problem:
        raise WebhookTargetRefused(problem)
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookTargetUnresolvable(f"webhook host {parts.hostname!r} does not resolve ({exc}); "
                                        "check the URL.") from None
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        why = policy.problem(ip, port)
        if why:
            raise WebhookTargetRefused(
                f"webhook host {parts.hostname!r} resolves to {ip}: {why}. Use a public address, or ask the "
                "operator to list its network in ROBUSTIFY_WEBHOOK_ALLOW_NETWORKS.")


# ------------------------------------------------------------------------------ messages
def event_type_of(job_event: Any) -> str | None:
    """The webhook event type of a job event, or None when no webhook is sent for it."""
    if job_event.type == "metrics":   # one per trained epoch (epoch 0, the input model's, is not news)
        return "job.progress" if ((job_event.data or {}).get("epoch") or 0) >= 1 else None
    if job_event.type == "status":
        return _STATUS_EVENTS.get((job_event.data or {}).get("status"))
    return None


def message_body(job: Any, event_type: str, job_event: Any, public_url: str | None) -> str:
    """The JSON body (compact, signed byte for byte): {type, timestamp, data}. `data` is a
    summary of the job; GET its `url` for everything else."""
    status = (job_event.data or {}).get("status") or job.status
    data: dict[str, Any] = {
        "id": job.id, "object": "job", "type": job.type, "status": status, "attempt": job.attempt,
        "model_id": job.model_id, "dataset": job.dataset, "metadata": job.meta,
        "url": f"{(public_url or '').rstrip('/')}/v1/jobs/{job.id}",
    }
    if event_type == "job.progress":
        metrics = dict(job_event.data or {})
        data.update(epoch=metrics.pop("epoch", None), total_epochs=metrics.pop("total_epochs", None),
                    metrics=metrics)
    elif event_type == "job.succeeded":
        data["result"] = job.result
    elif event_type == "job.failed":
        data["error"] = job.error
    when = job_event.created_at or utcnow()
    body = {"type": event_type, "timestamp": when.isoformat().replace("+00:00", "Z"), "data": data}
    return json.dumps(body, separators=(",", ":"), default=str)


# ------------------------------------------------------------------------------ the outbox
def _queue_deliveries(session: Session, _flush_context: Any, _instances: Any) -> None:
    new_events = [obj for obj in session.new if isinstance(obj, JobEvent)]
    if not new_events:
        return
    with session.no_autoflush:
        for job_event in new_events:
            event_type = event_type_of(job_event)
            if event_type is None:
                continue
            job = session.get(Job, job_event.job_id)
            if job is None or not job.webhook_endpoint_id:
                continue
            if job.webhook_events is not None and event_type not in job.webhook_events:
                continue
            try:
                payload = message_body(job, event_type, job_event, get_settings().public_url)
            except (TypeError, ValueError):  # a webhook must never break the job's own write
                log.exception("webhook %s of job %s could not be serialised; not sent", event_type, job.id)
                continue
            session.add(WebhookDelivery(
                id=new_message_id(), endpoint_id=job.webhook_endpoint_id, job_id=job.id,
                event_type=event_type, status="pending", attempts=0, attempt_log=[], payload=payload,
                next_attempt_at=job_event.created_at or utcnow(),
            ))


def install_outbox(maker: sessionmaker) -> None:
    """Sessions from `maker` queue webhook deliveries for the job events they write."""
    if not event.contains(maker, "before_flush", _queue_deliveries):
        event.listen(maker, "before_flush", _queue_deliveries)
