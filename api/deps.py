"""Request dependencies: the database session, the caller's API key, shared services."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy import orm
from sqlalchemy.orm import Session

from api.errors import ApiError
from core.apikeys import authenticate
from core.artifacts import Store
from core.settings import Settings


@dataclass
class Services:
    """What create_app builds once and every request shares (kept on app.state.services)."""

    settings: Settings
    sessionmaker: orm.sessionmaker
    store: Store
    celery: Celery


def services(request: Request) -> Services:
    return request.app.state.services


def db_session(svc: Services = Depends(services)) -> Iterator[Session]:
    with svc.sessionmaker() as session:
        yield session


@dataclass(frozen=True)
class Caller:
    """Who is asking: an API key id, or None when auth is off (every row then has owner None)."""

    key_id: str | None


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="robustify"'}


def caller(request: Request, svc: Services = Depends(services), session: Session = Depends(db_session)) -> Caller:
    if not svc.settings.auth_enabled:
        return Caller(None)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise ApiError(401, "unauthorized",
                       "missing API key: send `Authorization: Bearer rk_…` (create one with `robustify keys create NAME`).",
                       headers=_CHALLENGE)
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "the Authorization header must be `Bearer rk_…`.",
                       headers={"WWW-Authenticate": 'Bearer realm="robustify", error="invalid_request"'})
    key = authenticate(session, token.strip())
    if key is None:
        raise ApiError(401, "unauthorized", "invalid or revoked API key.",
                       headers={"WWW-Authenticate": 'Bearer realm="robustify", error="invalid_token"'})
    return Caller(key.id)


def owned(column: Any, who: Caller) -> Any:
    """SQL condition: the row belongs to the caller (NULL owner when auth is off)."""
    return column.is_(None) if who.key_id is None else column == who.key_id
