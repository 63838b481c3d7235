"""Fixtures of the service tests: a PostgreSQL database per test module, migrated by Alembic;
Redis queues with unique names (removed afterwards); the app in-process (TestClient) and,
where real HTTP matters, a live uvicorn server."""
from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select

import migrations
from core.service.apikeys import create_api_key
from core.service.db import Artifact, Job, JobEvent, Model, new_id, utcnow
from core.service.sessions import make_engine, make_sessionmaker
from core.service.settings import Settings

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"


def create_pg_database() -> tuple[str, str]:
    name = f"robustify_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    name, url = create_pg_database()
    try:
        migrations.upgrade(url)
        yield url
    finally:
        drop_pg_database(name)


class RedisQueues:
    """Unique queue names for one test module; `length(queue)` reads what the API enqueued."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.gpu = f"robustify_t_{tag}_gpu"
        self.cpu = f"robustify_t_{tag}_cpu"
        self.client = redis.Redis.from_url(REDIS_URL)

    def length(self, queue: str) -> int:
        return int(self.client.llen(queue))

    def messages(self, queue: str) -> list[dict[str, Any]]:
        import json

        return [json.loads(raw) for raw in self.client.lrange(queue, 0, -1)]

    def clear(self) -> None:
        for queue in (self.gpu, self.cpu):
            keys = list(self.client.scan_iter(f"*{queue}*"))
            if keys:
                self.client.delete(*keys)


@pytest.fixture(scope="module")
def queues() -> Iterator[RedisQueues]:
    q = RedisQueues()
    try:
        yield q
    finally:
        q.clear()
        q.client.close()


def make_settings(tmp: Path, database_url: str, q: RedisQueues, **over: Any) -> Settings:
    values: dict[str, Any] = dict(
        data_dir=tmp, database_url=database_url, broker_url=REDIS_URL, gpu_queue=q.gpu, cpu_queue=q.cpu,
        auth="on", max_upload_bytes=256 * 1024, sse_poll_seconds=0.05, sse_keepalive_seconds=0.3,
        stale_heartbeat_seconds=30,
    )
    values.update(over)
    return Settings(**values)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, pg_url: str, queues: RedisQueues) -> Settings:
    return make_settings(tmp_path_factory.mktemp("data"), pg_url, queues)


@pytest.fixture(scope="module")
def app(settings: Settings) -> Any:
    from api.app import create_app

    return create_app(settings)


@pytest.fixture(scope="module")
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


class Db:
    """Direct database access, standing in for the worker (which is another engineer's part)."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.Session = make_sessionmaker(self.engine)

    def count(self, entity: Any, *where: Any) -> int:
        with self.Session() as s:
            return int(s.scalar(select(func.count()).select_from(entity).where(*where)) or 0)

    def update(self, entity: Any, ident: str, **values: Any) -> None:
        with self.Session() as s:
            row = s.get(entity, ident)
            for k, v in values.items():
                setattr(row, k, v)
            s.commit()

    def get(self, entity: Any, ident: Any) -> Any:
        with self.Session() as s:
            return s.get(entity, ident)

    def add_event(self, job_id: str, type: str, data: dict | None = None, message: str = "") -> int:
        with self.Session() as s:
            ev = JobEvent(job_id=job_id, type=type, data=data, message=message)
            s.add(ev)
            s.commit()
            return ev.id

    def add_model(self, owner: str | None, status: str = "ready") -> str:
        with self.Session() as s:
            m = Model(id=new_id("mdl"), owner_key_id=owner, name="direct", source="upload",
                      architecture="small-cnn", num_classes=10, dataset="digits", input_shape=[1, 8, 8],
                      status=status)
            s.add(m)
            s.commit()
            return m.id

    def add_job(self, owner: str | None, model_id: str, status: str = "queued") -> str:
        with self.Session() as s:
            j = Job(id=new_id("job"), owner_key_id=owner, type="finetune", status=status, model_id=model_id,
                    dataset="digits", threat_model={"kind": "w2-linf", "delta": 0.03}, config={}, seed=0,
                    attempt=0, max_attempts=3, created_at=utcnow())
            s.add(j)
            s.commit()
            return j.id

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture(scope="module")
def db(pg_url: str) -> Iterator[Db]:
    d = Db(pg_url)
    yield d
    d.close()


@pytest.fixture(scope="module")
def keys(db: Db) -> dict[str, Any]:
    """Two API keys: `a` and `b`, with their ids and ready-made Authorization headers."""
    out: dict[str, Any] = {}
    with db.Session() as s:
        for name in ("a", "b"):
            row, plain = create_api_key(s, f"test-{name}")
            out[name] = {"id": row.id, "key": plain, "headers": {"Authorization": f"Bearer {plain}"}}
        s.commit()
    return out


def store_files(settings: Settings) -> list[Path]:
    """Every file under the artifact directory (stored artifacts and leftover temp files)."""
    root = settings.resolved_artifact_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server in a thread, for chunked uploads and live SSE streams."""

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start within 10 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


__all__ = ["Artifact", "Db", "LiveServer", "RedisQueues", "make_settings", "store_files"]
