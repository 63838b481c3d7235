"""A burst of concurrent requests against a live uvicorn on PostgreSQL with keys required.

The server must shed what it cannot serve (503 + Retry-After) instead of locking up: every
request gets 2xx or 503, /healthz answers at once afterwards, no connection is left idle in a
transaction, and SIGTERM stops the server even while a burst is in flight."""
from __future__ import annotations

import asyncio
import collections
import signal
import threading
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.e2e.conftest import PG_ADMIN_URL, kill_group, start_api, wait_until

pytestmark = [pytest.mark.service, pytest.mark.timeout(180)]

BURST = 400


async def _burst(url: str, key: str, n: int) -> list[tuple[Any, dict[str, str], str]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                 limits=limits) as client:
        async def one() -> tuple[Any, dict[str, str], str]:
            try:
                r = await client.get("/v1/jobs")
                return r.status_code, dict(r.headers), r.text[:300]
            except httpx.HTTPError as exc:
                return type(exc).__name__, {}, ""

        return await asyncio.gather(*(one() for _ in range(n)))


def _running_job(pg_url: str, api_key: str) -> str:
    """A job row of this key, running, with one event: its event stream stays open."""
    from core.service.apikeys import hash_key
    from core.service.db import ApiKey, Job, JobEvent, Model, new_id, utcnow
    from core.service.sessions import make_engine, make_sessionmaker

    engine = make_engine(pg_url)
    try:
        with make_sessionmaker(engine)() as s:
            owner = s.query(ApiKey).filter(ApiKey.key_hash == hash_key(api_key)).one().id
            model = Model(id=new_id("mdl"), owner_key_id=owner, name="m", source="upload", architecture="small-cnn",
                          num_classes=10, dataset="digits", status="ready")
            s.add(model)
            s.flush()
            job = Job(id=new_id("job"), owner_key_id=owner, type="finetune", status="running", model_id=model.id,
                      dataset="digits", threat_model={}, config={}, seed=0, attempt=1, max_attempts=3,
                      created_at=utcnow())
            s.add(job)
            s.flush()
            s.add(JobEvent(job_id=job.id, type="status", message="running", data={"status": "running"}))
            s.commit()
            return job.id
    finally:
        engine.dispose()


def test_a_burst_gets_2xx_or_503_and_the_server_stays_responsive(service_env: dict[str, str], pg_url: str,
                                                                   api_key: str, tmp_path: Any) -> None:
    # a short queue, so that shedding (503) shows up in a 400-request burst on any machine
    env = {**service_env, "ROBUSTIFY_MAX_CONCURRENT_REQUESTS": "8", "ROBUSTIFY_REQUEST_QUEUE_SECONDS": "1"}
    proc, url = start_api(env, tmp_path / "api.log")
    try:
        results = asyncio.run(_burst(url, api_key, BURST))
        counts = collections.Counter(status for status, _, _ in results)
        print(f"burst of {BURST}: {dict(counts)}")
        assert set(counts) <= {200, 503}, counts
        assert counts[200] >= 8, counts
        for status, headers, body in results:
            if status == 503:
                assert headers["content-type"].startswith("application/problem+json"), body
                assert headers["retry-after"].isdigit() and '"code":"service_busy"' in body, body

        start = time.monotonic()
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        assert time.monotonic() - start < 5
        assert httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {api_key}"},
                         timeout=5).status_code == 200

        database = pg_url.rsplit("/", 1)[1]
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        try:
            def idle_in_transaction() -> int:
                with admin.connect() as conn:
                    return int(conn.execute(text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND state = 'idle in transaction'"),
                        {"db": database}).scalar() or 0)

            wait_until(lambda: idle_in_transaction() == 0, 10, "no connection idle in a transaction")
        finally:
            admin.dispose()

        # SIGTERM in the middle of a second burst, with an event stream open on a running job: the
        # server still stops promptly, and the stream ends cleanly (the client reconnects elsewhere)
        job_id = _running_job(pg_url, api_key)
        streamed: list[str] = []

        def follow() -> None:
            with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=60,
                              headers={"Authorization": f"Bearer {api_key}", "Accept": "text/event-stream"}) as r:
                streamed.extend(r.iter_lines())

        stream = threading.Thread(target=follow, daemon=True)
        stream.start()
        wait_until(lambda: any(line.startswith("data: ") for line in streamed), 10, "the stream's first event")
        second = threading.Thread(target=lambda: asyncio.run(_burst(url, api_key, BURST)), daemon=True)
        second.start()
        time.sleep(1.0)
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        assert time.monotonic() - stopped_at < 15
        stream.join(timeout=10)
        assert not stream.is_alive(), "the event stream did not end when the server stopped"
        second.join(timeout=70)
    finally:
        kill_group(proc)
