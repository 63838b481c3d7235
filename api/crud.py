"""The caller's rows: every ownership lookup the routes share, in one place (as the FastAPI
full-stack template keeps its crud module).

A row belongs to the API key that created it; with auth off every row has owner NULL. A row of
another key is answered exactly like a missing one (404 not_found), so ids of other keys cannot
be probed.
"""
from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import Caller
from api.errors import not_found
from core.service.db import Dataset, Job, Model, WebhookEndpoint

Row = TypeVar("Row")


def owned(column: Any, who: Caller) -> Any:
    """SQL condition: the row belongs to the caller (NULL owner when auth is off)."""
    return column.is_(None) if who.key_id is None else column == who.key_id


def _found(row: Row | None, kind: str, ident: str) -> Row:
    if row is None:
        raise not_found(kind, ident)
    return row


def get_owned_job(session: Session, who: Caller, job_id: str) -> Job:
    return _found(session.scalar(select(Job).where(Job.id == job_id, owned(Job.owner_key_id, who))), "job", job_id)


def visible_models(who: Caller) -> list[Any]:
    """The caller's models that were not deleted (a deleted row stays for the jobs that used it)."""
    return [owned(Model.owner_key_id, who), Model.deleted_at.is_(None)]


def get_owned_model(session: Session, who: Caller, model_id: str) -> Model:
    return _found(session.scalar(select(Model).where(Model.id == model_id, *visible_models(who))), "model", model_id)


def find_owned_dataset(session: Session, who: Caller, dataset_id: str) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.id == dataset_id, owned(Dataset.owner_key_id, who)))


def get_owned_dataset(session: Session, who: Caller, dataset_id: str) -> Dataset:
    return _found(find_owned_dataset(session, who, dataset_id), "dataset", dataset_id)


def live_endpoints(who: Caller) -> list[Any]:
    """The caller's webhook endpoints that were not deleted (a deleted one stays for its deliveries)."""
    return [owned(WebhookEndpoint.owner_key_id, who), WebhookEndpoint.deleted_at.is_(None)]


def get_owned_endpoint(session: Session, who: Caller, endpoint_id: str) -> WebhookEndpoint:
    endpoint = session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id, *live_endpoints(who)))
    return _found(endpoint, "webhook endpoint", endpoint_id)
