"""Sending webhooks: a thread in the worker's parent process drains the webhook_deliveries outbox.

Why here, and not a Celery task: a worker runs one job at a time per GPU, so a task queued on
the same worker would wait behind a fine-tune for hours, while the parent process idles next
to its training child, touches no CUDA, and already runs the maintenance thread. Every state
lives in the database, so a restart loses nothing: a delivery whose lease ran out (its
dispatcher died mid-send) is taken up again by any worker. Delivery is at least once; the
`webhook-id` header (the same on every retry) lets receivers drop repeats.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from datetime import timedelta
from typing import Any, cast

import httpx
from sqlalchemy import CursorResult, or_, select, update

from core.service.db import WebhookDelivery, WebhookEndpoint, utcnow
from core.service.webhooks import WebhookTargetRefused, WebhookTargetUnresolvable, check_target, policy_of
from robustify.webhooks import sign
from worker.outage import OutageLog
from worker.runtime import Runtime, runtime

log = logging.getLogger("robustify.webhooks")

_BATCH = 20


class WebhookDispatcher:
    def __init__(self, rt: Runtime | None = None) -> None:
        self.rt = rt or runtime()
        self.settings = self.rt.settings
        # No redirects: a 3xx is a failure (Standard Webhooks), and following one could lead inwards.
        self.http = httpx.Client(timeout=self.settings.webhook_timeout_seconds, follow_redirects=False,
                                 headers={"User-Agent": "robustify-webhooks"})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="robustify-webhooks", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> WebhookDispatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.http.close()

    def _loop(self) -> None:
        outage = OutageLog("webhook dispatch", log)
        while not self._stop.is_set():
            try:
                sent = self.run_once()
            except Exception as exc:  # the database may be briefly unreachable; try again next round
                outage.failed(exc)
                sent = 0
            else:
                outage.succeeded()
            if not sent:
                self._stop.wait(self.settings.webhook_poll_seconds)

    # ------------------------------------------------------------------ one round
    def run_once(self) -> int:
        """Claim the deliveries that are due and send each once; returns how many were tried."""
        tried = 0
        for delivery_id in self._due():
            if self._stop.is_set():
                break
            if self._lease(delivery_id):
                self._deliver(delivery_id)
                tried += 1
        return tried

    def _due(self) -> list[str]:
        now = utcnow()
        with self.rt.session() as s:
            return list(s.scalars(
                select(WebhookDelivery.id).where(
                    WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now,
                    or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < now))
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id).limit(_BATCH)))

    def _lease(self, delivery_id: str) -> bool:
        """Take the row for one attempt (a conditional UPDATE: one dispatcher wins, on any database)."""
        now = utcnow()
        until = now + timedelta(seconds=self.settings.webhook_timeout_seconds + 30)
        with self.rt.session() as s:
            res = cast(CursorResult[Any], s.execute(update(WebhookDelivery).where(
                WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
                or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < now))
                .values(locked_until=until)))
            s.commit()
            return res.rowcount == 1

    def _deliver(self, delivery_id: str) -> None:
        with self.rt.session() as s:
            delivery = s.get(WebhookDelivery, delivery_id)
            endpoint = s.get(WebhookEndpoint, delivery.endpoint_id) if delivery is not None else None
            if delivery is None or endpoint is None:
                return
            url, secret, body = endpoint.url, endpoint.secret, delivery.payload.encode()
            deleted = endpoint.deleted_at is not None
        started = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        retry_after: float | None = None
        final = False
        if deleted:
            error, final = "the endpoint was deleted", True
        else:
            try:
                check_target(url, policy_of(self.settings))
                stamp = int(time.time())
                response = self.http.post(url, content=body, headers={
                    "Content-Type": "application/json", "webhook-id": delivery_id,
                    "webhook-timestamp": str(stamp), "webhook-signature": sign(secret, delivery_id, stamp, body)})
                status_code = response.status_code
                if not 200 <= status_code < 300:
                    error = f"HTTP {status_code}"
                    retry_after = _seconds(response.headers.get("retry-after"))
            except WebhookTargetRefused as exc:  # refused now (e.g. its name resolves inwards): no retry
                error, final = f"{exc.code}: {exc.message}", True
            except WebhookTargetUnresolvable as exc:  # DNS may come back: retried like a failed send
                error = f"{exc.code}: {exc.message}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
        self._record(delivery_id, status_code, error, final, retry_after, int(1000 * (time.monotonic() - started)))

    def _record(self, delivery_id: str, status_code: int | None, error: str | None, final: bool,
                retry_after: float | None, duration_ms: int) -> None:
        now = utcnow()
        with self.rt.session() as s:
            delivery = s.get(WebhookDelivery, delivery_id)
            if delivery is None:
                return
            delivery.attempts += 1
            delivery.attempt_log = [*(delivery.attempt_log or []), {
                "at": now.isoformat().replace("+00:00", "Z"), "status_code": status_code, "error": error,
                "duration_ms": duration_ms}]
            delivery.locked_until = None
            if error is None:
                delivery.status, delivery.delivered_at = "succeeded", now
                log.info("webhook %s (%s of job %s) delivered", delivery_id, delivery.event_type, delivery.job_id)
            elif final or delivery.attempts >= self.settings.webhook_max_attempts:
                delivery.status = "failed"
                log.warning("webhook %s (%s of job %s) failed for good after %d attempts: %s", delivery_id,
                            delivery.event_type, delivery.job_id, delivery.attempts, error)
            else:
                delay = self.backoff(delivery.attempts, retry_after)
                delivery.next_attempt_at = now + timedelta(seconds=delay)
                log.info("webhook %s (%s of job %s) attempt %d failed (%s); retry in %.1f s", delivery_id,
                         delivery.event_type, delivery.job_id, delivery.attempts, error, delay)
            s.commit()

    def backoff(self, attempts: int, retry_after: float | None = None) -> float:
        """Exponential: base·2^(n−1), ±20 % jitter (so failing receivers are not hit in step),
        capped; a longer Retry-After from the receiver wins."""
        base = self.settings.webhook_retry_base_seconds * 2 ** (attempts - 1)
        delay = min(self.settings.webhook_retry_max_seconds, base * random.uniform(0.8, 1.2))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.settings.webhook_retry_max_seconds))
        return delay


def _seconds(header: str | None) -> float | None:
    if header and header.strip().isdigit():
        return float(header)
    return None

