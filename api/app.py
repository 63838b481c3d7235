"""The FastAPI application factory. Serve it with `uvicorn --factory api.app:create_app`.

Nothing here imports torch: the API process stays small and starts fast.
"""
from __future__ import annotations

import logging
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import anyio.to_thread
from fastapi import FastAPI

from api.binding import AuthPolicy
from api.catalog import ArchitectureCatalog
from api.deps import Services
from api.errors import install_error_handlers
from api.guards import BodyLimits, ConcurrencyLimit, RequestChecks
from api.metrics import install_metrics
from api.openapi import add_security_and_problems
from api.routes import architectures, datasets, jobs, models, ops, sweeps, webhooks
from api.routes.docs import install_api_docs
from api.routes.ui import install_dashboard
from api.schemas import add_recipe_schemas
from api.tenants import Shares
from core.service.logs import configure_logging
from core.service.queue import make_celery
from core.service.sessions import make_engine, make_sessionmaker
from core.service.settings import Settings, get_settings
from core.storage.artifacts import open_store

log = logging.getLogger("robustify.api")

# Worker threads beyond the request slots: event-stream polls and the key lookups of requests
# that wait for nothing else. With more threads than slots, no request in the app ever waits
# for a thread while it holds a database connection.
_SPARE_THREADS = 8


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for `settings` (default: from ROBUSTIFY_* environment variables).

    The schema must already be migrated (`robustify migrate`, or migrations.upgrade(url)).
    """
    settings = settings or get_settings()
    if settings.log_format == "json":
        configure_logging(fmt="json", component="api", level=settings.log_level)
    engine = make_engine(settings.resolved_database_url, pool_size=settings.db_pool_size,
                         max_overflow=settings.db_max_overflow, pool_timeout=settings.db_pool_timeout_seconds)
    svc = Services(settings=settings, sessionmaker=make_sessionmaker(engine), store=open_store(settings),
                   celery=make_celery(settings), auth=AuthPolicy(settings))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, settings.max_concurrent_requests + _SPARE_THREADS)
        removed = svc.store.remove_stale_temp_files()
        if removed:
            log.info("removed %d temp files left by stopped processes", removed)
        restore = _notice_shutdown(svc.shutting_down)
        try:
            yield
        finally:
            restore()
            app.state.architecture_catalog.close()
            engine.dispose()

    app = FastAPI(
        title="robustify",
        version="1",
        summary="Make image classifiers robust to distribution shift: W-TRADES fine-tuning and "
                "W2 / l-infinity robustness evaluation.",
        lifespan=lifespan,
        docs_url=None, redoc_url=None,  # served from the package's own files (api/routes/docs.py)
    )
    app.state.services = svc
    app.state.shares = Shares.from_settings(settings)
    app.state.architecture_catalog = ArchitectureCatalog(settings.data_dir / "cache")
    install_error_handlers(app)
    for router in (models.router, architectures.router, datasets.router, jobs.router, sweeps.router,
                   webhooks.router, ops.router):
        app.include_router(router)
    install_dashboard(app)
    install_api_docs(app)
    # Added innermost first: checks and OPTIONS, then the concurrency limit, then the body caps.
    app.add_middleware(BodyLimits, settings=settings)
    app.add_middleware(ConcurrencyLimit, settings=settings)
    app.add_middleware(RequestChecks, auth=svc.auth)
    app.state.metrics_registry = install_metrics(app, svc.sessionmaker)  # outermost: sees every answer

    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            decided = settings.auth_decided
            keys_possible = decided if decided is not None else not svc.auth.loopback_only()
            app.openapi_schema = add_security_and_problems(add_recipe_schemas(default_openapi()),
                                                           keys_possible=keys_possible)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _notice_shutdown(event: threading.Event) -> Any:
    """Set `event` when the server is told to stop (SIGTERM / SIGINT), then run the server's own
    handler: open event streams end at once instead of holding the shutdown. Only the main
    thread may install handlers, and only a server's handler is wrapped (a server in a thread,
    or none, changes nothing)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    installed = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous = {sig: h for sig, h in installed.items() if callable(h) and h is not signal.default_int_handler}

    def handler(sig: int, frame: FrameType | None) -> None:
        event.set()
        previous[signal.Signals(sig)](sig, frame)

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, old)

    return restore
