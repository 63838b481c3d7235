"""The FastAPI application factory. Serve it with `uvicorn --factory api.app:create_app`.

Nothing here imports torch: the API process stays small and starts fast.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.deps import Services
from api.errors import install_error_handlers
from api.metrics import install_metrics
from api.routes import architectures, datasets, jobs, models, ops, webhooks
from api.routes.ui import install_dashboard
from api.schemas import add_recipe_schemas
from core.artifacts import open_store
from core.db import make_engine, make_sessionmaker
from core.logs import configure_logging
from core.queue import make_celery
from core.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for `settings` (default: from ROBUSTIFY_* environment variables).

    The schema must already be migrated (`robustify migrate`, or migrations.upgrade(url)).
    """
    settings = settings or get_settings()
    if settings.log_format == "json":
        configure_logging(fmt="json", component="api", level=settings.log_level)
    engine = make_engine(settings.resolved_database_url)
    svc = Services(settings=settings, sessionmaker=make_sessionmaker(engine), store=open_store(settings),
                   celery=make_celery(settings))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(
        title="robustify",
        version="1",
        summary="Make image classifiers robust to distribution shift: W-TRADES fine-tuning and "
                "W2 / l-infinity robustness evaluation.",
        lifespan=lifespan,
    )
    app.state.services = svc
    app.state.metrics_registry = install_metrics(app, svc.sessionmaker)
    install_error_handlers(app)
    for router in (models.router, architectures.router, datasets.router, jobs.router, webhooks.router, ops.router):
        app.include_router(router)
    install_dashboard(app)

    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = add_recipe_schemas(default_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
