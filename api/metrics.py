"""Prometheus metrics: request counts and latencies by route, jobs by status (read at scrape time)."""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from core.service.db import Job
from core.states import JOB_STATES


class _JobsByStatus:
    """A collector that counts job rows per status when Prometheus scrapes."""

    def __init__(self, make_session: sessionmaker) -> None:
        self.make_session = make_session

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("robustify_jobs", "Jobs by status", labels=["status"])
        try:
            with self.make_session() as session:
                counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        except Exception:  # the database is down: /readyz says so; keep /metrics answering
            return
        for state in sorted(set(JOB_STATES) | set(counts)):
            gauge.add_metric([state], counts.get(state, 0))
        yield gauge


def install_metrics(app: FastAPI, make_session: sessionmaker) -> CollectorRegistry:
    """Per-app registry, so several apps in one process (tests) do not collide."""
    registry = CollectorRegistry()
    requests = Counter("robustify_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("robustify_http_request_duration_seconds", "Time to the response headers",
                        ["method", "route"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    registry.register(_JobsByStatus(make_session))

    @app.middleware("http")
    async def _measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            # Route templates, never raw paths: ids would explode the label set.
            name = getattr(route, "path", None) or "unmatched"
            requests.labels(request.method, name, str(status)).inc()
            latency.labels(request.method, name).observe(time.perf_counter() - start)

    return registry
