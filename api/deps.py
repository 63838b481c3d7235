"""Request dependencies: the database session, the caller's API key, shared services.

Routes take them as Annotated aliases (`session: SessionDep`, `who: CallerDep`, `svc:
ServicesDep`). No dependency keeps a database connection while it waits for anything: the key
lookup uses a session of its own, closed before the route runs, and SessionDep has
`scope="function"`, so its session closes as soon as the route returns (before a download
streams to a slow client).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import orm
from sqlalchemy.orm import Session

from api.binding import AuthPolicy
from api.errors import ApiError
from core.errors import ErrorCode
from core.service.apikeys import authenticate
from core.service.settings import Settings
from core.storage.artifacts import Store


@dataclass
class Services:
    """What create_app builds once and every request shares (kept on app.state.services)."""

    settings: Settings
    sessionmaker: orm.sessionmaker
    store: Store
    celery: Celery
    auth: AuthPolicy
    # set when the server was told to stop: event streams end so that it can (clients reconnect)
    shutting_down: threading.Event = field(default_factory=threading.Event)


def services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(services)]


def db_session(svc: ServicesDep) -> Iterator[Session]:
    with svc.sessionmaker() as session:
        yield session


# Closed when the route function returns, not after the response was sent (a download to a
# slow client holds no connection).
SessionDep = Annotated[Session, Depends(db_session, scope="function")]


@dataclass(frozen=True)
class Caller:
    """Who is asking: an API key id, or None when auth is off (every row then has owner None)."""

    key_id: str | None


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="robustify"'}


async def caller(request: Request, svc: ServicesDep) -> Caller:
    if not svc.auth.keys_required(request.scope):
        return Caller(None)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise ApiError(401, ErrorCode.UNAUTHORIZED,
                       "missing API key: send `Authorization: Bearer rk_…` (create one with "
                       "`robustify keys create NAME`).",
                       headers=_CHALLENGE)
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, ErrorCode.UNAUTHORIZED, "the Authorization header must be `Bearer rk_…`.",
                       headers={"WWW-Authenticate": 'Bearer realm="robustify", error="invalid_request"'})
    key_id = await run_in_threadpool(_key_id, svc, token.strip())
    if key_id is None:
        raise ApiError(401, ErrorCode.UNAUTHORIZED, "invalid or revoked API key.",
                       headers={"WWW-Authenticate": 'Bearer realm="robustify", error="invalid_token"'})
    return Caller(key_id)


def _key_id(svc: Services, token: str) -> str | None:
    with svc.sessionmaker() as session:  # closed before the route runs: no connection held across a wait
        key = authenticate(session, token)
        return key.id if key is not None else None


CallerDep = Annotated[Caller, Depends(caller)]
