"""Log lines of the API and the worker: plain text (default) or one JSON object a line.

ROBUSTIFY_LOG_FORMAT=json turns every line into a JSON object that log shippers read without
parsing rules. While a worker processes a job, `job_context` puts the job id, the attempt and
the worker id on every line, whichever logger writes it (a context variable read by a filter
on the handler, so library lines such as Celery's carry them too).
"""
from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]

_JOB: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("robustify_job", default=None)
CONTEXT_FIELDS = ("job_id", "attempt", "worker_id")
# Loggers of the libraries whose INFO lines are noise next to the job's own lines.
LIBRARY_LOGGERS = ("celery", "kombu", "amqp", "uvicorn.access")


@contextmanager
def job_context(job_id: str, attempt: int, worker_id: str) -> Iterator[None]:
    """Every line logged inside (in this thread or a context copied from it) names the job."""
    token = _JOB.set({"job_id": job_id, "attempt": attempt, "worker_id": worker_id})
    try:
        yield
    finally:
        _JOB.reset(token)


class JobContextFilter(logging.Filter):
    """Copies the current job context onto the record (None outside a job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _JOB.get() or {}
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, ctx.get(name))
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(job)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        job_id = getattr(record, "job_id", None)
        record.job = f" [{job_id} attempt {record.attempt} on {record.worker_id}]" if job_id else ""  # type: ignore[attr-defined]
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, component, the job context, exc."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "component": self.component,
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            # uvicorn passes (client, method, path, http version, status): keep them as fields
            client, method, path, _, status = record.args
            line.update(client=client, method=method, path=path, status=status)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(*, fmt: LogFormat, component: str, level: str = "INFO",
                      library_level: str | None = None) -> None:
    """Send every logger's lines through one stderr handler in `fmt` (idempotent: a second call
    replaces the handler). `library_level` quiets Celery's and uvicorn's access lines."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_robustify", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler._robustify = True  # type: ignore[attr-defined]
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonFormatter(component) if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("robustify").setLevel(level.upper())
    if fmt == "json":
        # uvicorn installs handlers of its own that do not propagate: route them through ours
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            lg = logging.getLogger(name)
            lg.handlers.clear()
            lg.propagate = True
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel((library_level or level).upper())
    # httpx logs every request at INFO; the webhook dispatcher logs each delivery itself
    logging.getLogger("httpx").setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING)
