"""Per-process worker state: settings, the database engine, the artifact store, this worker's id.

Engines are created lazily and per process id: a prefork child must never reuse the parent's
database connections (they are not safe to share across fork).
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.service.db import as_utc, utcnow
from core.service.process import HOSTNAME, pid_alive
from core.service.sessions import make_engine, make_sessionmaker
from core.service.settings import Settings, get_settings
from core.storage.artifacts import Store, open_store


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessionmaker: sessionmaker
    store: Store
    pid: int

    def session(self) -> Session:
        return self.sessionmaker()

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"


_runtime: Runtime | None = None

# Set when this process was told to stop (SIGTERM): a running job checkpoints and is handed
# back to the queue instead of running to its end (worker/celery_app.py installs the handler).
shutdown_requested = threading.Event()
# Set by the worker's main process when its warm shutdown begins. Shared memory made before the
# pool processes fork, so they see it too: a job message that still reaches a stopping worker
# (its consumer takes one more while it winds down; a handed-back job comes straight back) is
# left in the queue instead of being started there.
_worker_stopping = multiprocessing.RawValue(ctypes.c_bool, False)


def mark_worker_stopping() -> None:
    """In the main process, from its signal handler (one store to shared memory)."""
    _worker_stopping.value = True


def worker_stopping() -> bool:
    """Whether this worker is shutting down (this process was told, or its main process was)."""
    return shutdown_requested.is_set() or bool(_worker_stopping.value)


def runtime() -> Runtime:
    """The current process's runtime (rebuilt after a fork)."""
    global _runtime
    pid = os.getpid()
    if _runtime is None or _runtime.pid != pid:
        settings = get_settings()
        engine = make_engine(settings.resolved_database_url)
        _runtime = Runtime(settings, engine, make_sessionmaker(engine), open_store(settings), pid)
    return _runtime


def reset_after_fork() -> None:
    """Forget the parent's engine without closing its connections (they belong to the parent)."""
    global _runtime
    if _runtime is not None and _runtime.pid != os.getpid():
        _runtime.engine.dispose(close=False)
        _runtime = None


def worker_id() -> str:
    """host:pid of the process running a job; the sweep uses it to tell a dead process at once."""
    return f"{HOSTNAME}:{os.getpid()}"


def owner_is_dead(owner: str | None) -> bool:
    """True when `owner` (host:pid) is a process on this host that no longer exists."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != HOSTNAME or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not pid_alive(int(pid))


def heartbeat_is_stale(heartbeat_at: datetime | None, owner: str | None, settings: Settings) -> bool:
    """A running job's owner counts as gone when its heartbeat is old or its process is dead."""
    hb = as_utc(heartbeat_at)
    if hb is None or utcnow() - hb > timedelta(seconds=settings.stale_heartbeat_seconds):
        return True
    return owner_is_dead(owner)
