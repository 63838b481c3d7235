"""/v1/datasets: upload an .npz (x uint8 images, y int labels); list, get, delete.

Built-in data sets (digits, fashion-mnist, cifar10, cifar100) need no upload.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.bodies import media_type, parse_metadata_field, read_multipart
from api.deps import SESSION, Caller, Services, caller, owned, services
from api.errors import ApiError, not_found
from api.routes.common import ID_PATTERN, MAX_PAGE, paginate
from api.schemas import dataset_object, page
from core.artifacts import commit_or_unstore, delete_artifact, record_artifact
from core.db import Artifact, Dataset, Job, TERMINAL_STATES, new_id
from core.settings import Settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": ".npz with x (uint8, NxHxWxC or NxCxHxW) and y (int labels)"},
                   "name": {"type": "string"}, "metadata": {"type": "string"}}}}}}}


def inspect_npz(path: Path, settings: Settings) -> dict[str, Any]:
    """num_examples, num_classes and image_shape [C,H,W] of a valid .npz; else InvalidDataset."""
    from core.npz import summarize_npz  # numpy only: the API process stays free of torch

    return summarize_npz(path, label="the uploaded .npz", max_bytes=settings.max_dataset_bytes)


@router.post("", status_code=201, openapi_extra=_OPENAPI, summary="Upload a data set (.npz)")
async def create_dataset(request: Request, svc: Services = Depends(services), who: Caller = Depends(caller),
                         session: Session = SESSION) -> dict[str, Any]:
    if media_type(request) != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "send the .npz as multipart/form-data in a part named `file`.")
    upload = await read_multipart(request, svc.store, svc.settings.max_upload_bytes)
    try:
        return await run_in_threadpool(_create, svc, session, who, upload.fields, upload.file_path, upload.filename)
    finally:
        upload.discard()


def _create(svc: Services, session: Session, who: Caller, fields: dict[str, str],
            file_path: Path | None, filename: str | None) -> dict[str, Any]:
    if file_path is None:
        raise ApiError(422, "validation_error", "the `file` part (an .npz) is missing.",
                       errors=[{"loc": ["body", "file"], "field": "file", "msg": "Field required", "type": "missing"}])
    meta = parse_metadata_field(fields.get("metadata"), svc.settings)
    # Everything is checked before the file enters the store, so a refusal leaves nothing behind.
    info = inspect_npz(file_path, svc.settings)
    name = (fields.get("name") or filename or "dataset.npz").strip()[:200]
    art = record_artifact(session, svc.store, kind="dataset", src_path=file_path, move=True,
                          filename=name if name.endswith(".npz") else f"{name}.npz",
                          content_type="application/octet-stream", owner_key_id=who.key_id)
    ds = Dataset(id=new_id("ds"), owner_key_id=who.key_id, name=name, status="ready", artifact_id=art.id,
                 meta=meta, **info)
    session.add(ds)
    commit_or_unstore(session, svc.store, art.sha256)
    return dataset_object(ds, art)


def _artifact(session: Session, ds: Dataset) -> Artifact | None:
    return session.get(Artifact, ds.artifact_id) if ds.artifact_id else None


def get_owned_dataset(session: Session, who: Caller, dataset_id: str) -> Dataset:
    ds = session.scalar(select(Dataset).where(Dataset.id == dataset_id, owned(Dataset.owner_key_id, who)))
    if ds is None:
        raise not_found("dataset", dataset_id)
    return ds


@router.get("", summary="List uploaded data sets")
def list_datasets(limit: int = Query(20, ge=1, le=MAX_PAGE), after: str | None = Query(None, pattern=ID_PATTERN),
                  who: Caller = Depends(caller), session: Session = SESSION) -> dict[str, Any]:
    mine = owned(Dataset.owner_key_id, who)
    rows, more = paginate(session, select(Dataset).where(mine), Dataset, after, limit, after_filter=mine)
    return page([dataset_object(d, _artifact(session, d)) for d in rows], more)


@router.get("/{dataset_id}", summary="Get a data set")
def get_dataset(dataset_id: str, who: Caller = Depends(caller), session: Session = SESSION) -> dict[str, Any]:
    ds = get_owned_dataset(session, who, dataset_id)
    return dataset_object(ds, _artifact(session, ds))


@router.delete("/{dataset_id}", summary="Delete a data set")
def delete_dataset(dataset_id: str, svc: Services = Depends(services), who: Caller = Depends(caller),
                   session: Session = SESSION) -> dict[str, Any]:
    ds = get_owned_dataset(session, who, dataset_id)
    busy = session.scalar(select(Job.id).where(Job.dataset == ds.id, Job.status.not_in(TERMINAL_STATES)).limit(1))
    if busy:
        raise ApiError(409, "conflict", f"data set {ds.id} is used by job {busy}, which has not finished; "
                                        "cancel it or wait for it to finish first.", job_id=busy)
    art = _artifact(session, ds)
    session.delete(ds)
    session.flush()
    if art is not None:
        delete_artifact(session, svc.store, art)
    session.commit()
    return {"id": dataset_id, "object": "dataset", "deleted": True}
