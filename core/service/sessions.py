"""Database engines and sessions: the backend pragmas, the pool bounds, and the webhook outbox
that every session installs (core.service.db holds only the models)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from core.service.webhooks import install_outbox


def make_engine(url: str, *, pool_size: int = 5, max_overflow: int = 10, pool_timeout: float = 30.0) -> Engine:
    """An engine with the pragmas each backend needs (SQLite: WAL, foreign keys, busy timeout).

    `pool_timeout` bounds the wait for a free pooled connection: the API passes a short one so
    that a burst gets a quick 503 rather than requests queued behind each other for minutes."""
    pool = {"pool_size": pool_size, "max_overflow": max_overflow, "pool_timeout": pool_timeout}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)  # first start of the embedded default
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               **(pool if path and path != ":memory:" else {}))

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    maker = sessionmaker(engine, expire_on_commit=False)
    install_outbox(maker)  # job events that a webhook listens to queue a delivery in the same commit
    return maker
