"""Riding out a database outage: a job never fails because PostgreSQL was briefly away.

Writes that must happen (a checkpoint's rows, the finished job) are retried for up to the
stale-heartbeat limit, the time after which another worker may take the job over anyway.
Writes that may wait (progress, events, heartbeats) are kept and sent with the next one
(worker/hooks.py). A task that cannot read its job row at all goes back to the queue.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

log = logging.getLogger("robustify.worker")

T = TypeVar("T")


class DatabaseUnavailable(Exception):
    """The database stayed unreachable longer than a task may wait; its message is requeued."""


def is_database_down(exc: BaseException) -> bool:
    """A lost or refused connection (not a bad statement): the same write may succeed later."""
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeout)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def retry_while_down(write: Callable[[], T], *, seconds: float, what: str) -> T:
    """`write()`, retried with backoff while the database is down, for at most `seconds`;
    then the last error is raised."""
    deadline = time.monotonic() + seconds
    delay = 0.25
    while True:
        try:
            return write()
        except Exception as exc:
            if not is_database_down(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: the database is unreachable (%s); retrying in %.2g s", what, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class OutageLog:
    """Logs a background loop's failures so that an operator reads one line per database outage:
    a WARNING (no traceback) when the loop first finds the database unreachable and an INFO when
    it gets through again. Any other failure is an ERROR with its traceback, every time."""

    def __init__(self, what: str, logger: logging.Logger = log) -> None:
        self.what, self.log = what, logger
        self.down_since: float | None = None

    def failed(self, exc: BaseException) -> None:
        if not is_database_down(exc):
            self.log.error("%s failed", self.what, exc_info=exc)
            return
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.log.warning("%s: the database is unreachable (%s); retrying quietly until it is back",
                             self.what, type(exc).__name__)

    def succeeded(self) -> None:
        if self.down_since is not None:
            self.log.info("%s: the database is reachable again after %.0f s", self.what,
                          time.monotonic() - self.down_since)
            self.down_since = None
