"""/v1/datasets: upload an .npz (x uint8 images, y int labels) or a .zip / .tar of class folders;
list, get, delete.

Built-in data sets (digits, fashion-mnist, cifar10, cifar100) need no upload; GET answers their card
(core/engine/data/cards.py). An image-folder
archive is decoded here (core/engine/data/imagefolder.py, numpy and Pillow) and stored as the project's own
.npz with its train/test split and class names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import responses as r
from api.bodies import media_type, parse_metadata_field, read_multipart
from api.crud import get_owned_dataset, owned
from api.deps import Caller, CallerDep, Services, ServicesDep, SessionDep
from api.errors import ApiError
from api.routes.common import PageAfter, PageLimit, paginate
from api.schemas import BUILTIN_DATASETS
from api.tenants import shares
from core.engine.data.census import npz_labels, split_counts
from core.errors import ErrorCode
from core.service.db import Artifact, Dataset, Job, new_id
from core.service.settings import Settings
from core.states import TERMINAL_STATES
from core.storage.artifacts import commit_or_unstore, delete_artifact, record_artifact

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

# The fields that shape how an image-folder archive is decoded carry "x-archive-only" (the
# dashboard groups them); an .npz upload refuses them.
_ARCHIVE_ONLY = {"x-archive-only": True}
_ARCHIVE_ONLY_NOTE = " Only for a .zip or .tar archive: an .npz upload that sends it is a 422 validation_error."
_FIELDS: dict[str, dict[str, Any]] = {
    "file": {"type": "string", "format": "binary",
             "description": ".npz with x (uint8, NxHxWxC or NxCxHxW) and y (int labels); or a .zip or .tar of "
                            "class folders (train/<class>/..., test/<class>/... or <class>/...)"},
    "name": {"type": "string"},
    "metadata": {"type": "string", "description": "a JSON object"},
    "image_size": {"type": "string", **_ARCHIVE_ONLY,
                   "description": "resize to S (square) or H,W: scaled to cover, centre-cropped; default: keep "
                                  "(all images one size)"},
    "channels": {"type": "integer", "enum": [1, 3], "default": 3, **_ARCHIVE_ONLY,
                 "description": "1 grayscale or 3 RGB"},
    "test_fraction": {"type": "number", "default": 0.2, "exclusiveMinimum": 0, "exclusiveMaximum": 1, **_ARCHIVE_ONLY,
                      "description": "class folders without train/ and test/: held-out share per class"},
    "seed": {"type": "integer", "default": 0, "minimum": 0, "maximum": 2**31 - 1, **_ARCHIVE_ONLY,
             "description": "seed of that split"},
}
for _field in _FIELDS.values():   # the schema says what the route does: JSON Schema cannot look inside the file
    if _field.get("x-archive-only"):
        _field["description"] += "." + _ARCHIVE_ONLY_NOTE
_OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": _FIELDS}}}}}


def npz_census(path: Path, num_classes: int) -> dict[str, list[int]]:
    """Images per class in the train and test splits a job will use (census.py; numpy only)."""
    return split_counts(*npz_labels(path), num_classes)


def inspect_npz(path: Path, settings: Settings) -> dict[str, Any]:
    """num_examples, num_classes and image_shape [C,H,W] of a valid .npz; else InvalidDataset."""
    from core.engine.data.npz import summarize_npz  # numpy only: the API process stays free of torch

    return summarize_npz(path, label="the uploaded .npz", max_bytes=settings.max_dataset_bytes)


@router.post("", status_code=201, response_model=r.Dataset, openapi_extra=_OPENAPI,
             summary="Upload a data set (.npz, or a .zip / .tar of class folders)")
async def create_dataset(request: Request, svc: ServicesDep, who: CallerDep, session: SessionDep) -> r.Dataset:
    if media_type(request) != "multipart/form-data":
        raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                       "send the .npz as multipart/form-data in a part named `file`.")
    with shares(request).uploads.held(who.key_id):  # the key's own share of the uploads (429 beyond it)
        upload = await read_multipart(request, svc.store, svc.settings.max_upload_bytes)
        try:
            return await run_in_threadpool(_create, svc, session, who, upload.fields, upload.file_path,
                                           upload.filename)
        finally:
            upload.discard()


def _create(svc: Services, session: Session, who: Caller, fields: dict[str, str],
            file_path: Path | None, filename: str | None) -> r.Dataset:
    if file_path is None:
        raise ApiError(422, ErrorCode.VALIDATION_ERROR, "the `file` part (an .npz) is missing.",
                       errors=[{"loc": ["body", "file"], "field": "file", "msg": "Field required", "type": "missing"}])
    meta = parse_metadata_field(fields.get("metadata"), svc.settings)
    name = (fields.get("name") or filename or "dataset.npz").strip()[:200]
    if upload_kind(file_path, filename) == "archive":
        return _create_from_archive(svc, session, who, fields, file_path, name, meta)
    if set(fields) & set(ARCHIVE_FIELDS):
        raise ApiError(422, ErrorCode.VALIDATION_ERROR,
                       f"{', '.join(sorted(set(fields) & set(ARCHIVE_FIELDS)))} apply to "
                       ".zip / .tar image folders, not to an .npz upload.")
    # Everything is checked before the file enters the store, so a refusal leaves nothing behind.
    info = inspect_npz(file_path, svc.settings)
    info["class_counts"] = npz_census(file_path, info["num_classes"])
    return _store(svc, session, who, file_path, name, meta, info)


def _store(svc: Services, session: Session, who: Caller, npz_path: Path, name: str, meta: dict[str, Any] | None,
           info: dict[str, Any]) -> r.Dataset:
    art = record_artifact(session, svc.store, kind="dataset", src_path=npz_path, move=True,
                          filename=name if name.endswith(".npz") else f"{name}.npz",
                          content_type="application/octet-stream", owner_key_id=who.key_id)
    ds = Dataset(id=new_id("ds"), owner_key_id=who.key_id, name=name, status="ready", artifact_id=art.id,
                 meta=meta, **info)
    session.add(ds)
    commit_or_unstore(session, svc.store, art.sha256, check=lambda: r.Dataset.from_row(ds, art).model_dump_json())
    return r.Dataset.from_row(ds, art)


# ------------------------------------------------------------------------------- image folders
ARCHIVE_FIELDS = tuple(name for name, schema in _FIELDS.items() if schema.get("x-archive-only"))
_ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".zip", ".tar")


def upload_kind(path: Path, filename: str | None) -> str:
    """"archive" for a .zip or .tar of image folders, "npz" otherwise (an .npz is a zip of .npy files)."""
    import zipfile

    from core.engine.data.imagefolder import ArchiveError, archive_format, open_zip

    kind = archive_format(path)
    if kind == "zip":
        try:
            with open_zip(path) as z:
                names = z.namelist()
        except ArchiveError:  # a member name that is not UTF-8: the archive reader says so
            return "archive"
        except zipfile.BadZipFile:  # a broken zip: its name says which reader should report it
            return "npz" if (filename or "").lower().endswith(".npz") else "archive"
        return "npz" if names and all(n.endswith(".npy") for n in names) else "archive"
    return "archive" if kind == "tar" else "npz"


def _archive_options(fields: dict[str, str]) -> dict[str, Any]:
    def bad(field: str, msg: str) -> ApiError:
        return ApiError(422, ErrorCode.VALIDATION_ERROR, f"invalid value for {field}: {msg}",
                        errors=[{"loc": ["body", field], "field": field, "msg": msg, "type": "value_error"}])

    options: dict[str, Any] = {"image_size": None, "channels": 3, "test_fraction": 0.2, "seed": 0}
    raw = fields.get("image_size", "").strip()
    if raw:
        try:
            sides = [int(v) for v in raw.replace("x", ",").split(",") if v.strip()]
        except ValueError:
            raise bad("image_size", 'give one side ("224") or height,width ("224,160")') from None
        if len(sides) not in (1, 2) or not all(8 <= v <= 4096 for v in sides):
            raise bad("image_size", "one or two sides, each between 8 and 4096 pixels")
        options["image_size"] = (sides[0], sides[-1])
    for field, parse, ok, rule in (("channels", int, lambda v: v in (1, 3), "1 (grayscale) or 3 (RGB)"),
                                   ("test_fraction", float, lambda v: 0.0 < v < 1.0, "between 0 and 1"),
                                   ("seed", int, lambda v: 0 <= v < 2**31, "an integer ≥ 0")):
        if fields.get(field, "").strip():
            try:
                value = parse(fields[field])
            except ValueError:
                raise bad(field, rule) from None
            if not ok(value):
                raise bad(field, rule)
            options[field] = value
    return options


def _create_from_archive(svc: Services, session: Session, who: Caller, fields: dict[str, str], archive: Path,
                         name: str, meta: dict[str, Any] | None) -> r.Dataset:
    """Decode an image-folder archive into the project's .npz (nothing is kept when it is refused)."""
    from core.engine.data.imagefolder import ImageFolderLimits, read_image_folder

    settings = svc.settings
    limits = ImageFolderLimits(max_uncompressed_bytes=settings.max_archive_bytes,
                               max_image_pixels=settings.max_image_pixels,
                               max_dataset_bytes=settings.max_dataset_bytes,
                               max_member_bytes=settings.max_archive_member_bytes,
                               max_members=settings.max_archive_members,
                               max_compression_ratio=settings.max_archive_ratio)
    data = read_image_folder(archive, limits=limits, **_archive_options(fields))
    npz_path = svc.store.temp_file(".npz")
    try:
        data.save_npz(npz_path)
        info = {"num_examples": len(data.y) + len(data.y_test), "num_classes": len(data.class_names),
                "image_shape": data.image_shape, "class_names": data.class_names,
                "splits": {"train": len(data.y), "test": len(data.y_test)},
                "class_counts": split_counts(data.y, data.y_test, len(data.class_names))}
        suffix = next((x for x in _ARCHIVE_SUFFIXES if name.lower().endswith(x)), "")
        return _store(svc, session, who, npz_path, name[:len(name) - len(suffix)] or name, meta, info)
    finally:
        npz_path.unlink(missing_ok=True)


def _artifact(session: Session, ds: Dataset) -> Artifact | None:
    return session.get(Artifact, ds.artifact_id) if ds.artifact_id else None


@router.get("", response_model=r.DatasetList, summary="List uploaded data sets")
def list_datasets(who: CallerDep, session: SessionDep, limit: PageLimit = 20,
                  after: PageAfter = None) -> r.DatasetList:
    mine = owned(Dataset.owner_key_id, who)
    rows, more = paginate(session, select(Dataset).where(mine), Dataset, after, limit, after_filter=mine)
    return r.DatasetList.page([r.Dataset.from_row(d, _artifact(session, d)) for d in rows], more)


@router.get("/{dataset_id}", response_model=r.Dataset, summary="Get a data set (a built-in one answers its card)",
            description="An uploaded data set by its id, or a built-in one by its name (digits, fashion-mnist, "
                        "cifar10, cifar100): its census, class names and `card` (source, licence, split rule and "
                        "seed, and Python that reproduces the train and test splits). docs/datasets.md says the same.")
def get_dataset(dataset_id: str, who: CallerDep, session: SessionDep) -> r.Dataset:
    if dataset_id in BUILTIN_DATASETS:   # a built-in data set answers its census and its card
        return r.Dataset.builtin(dataset_id)
    ds = get_owned_dataset(session, who, dataset_id)
    return r.Dataset.from_row(ds, _artifact(session, ds))


@router.delete("/{dataset_id}", response_model=r.Deleted, summary="Delete a data set")
def delete_dataset(dataset_id: str, svc: ServicesDep, who: CallerDep, session: SessionDep) -> r.Deleted:
    ds = get_owned_dataset(session, who, dataset_id)
    busy = session.scalar(select(Job.id).where(Job.dataset == ds.id, Job.status.not_in(TERMINAL_STATES)).limit(1))
    if busy:
        raise ApiError(409, ErrorCode.CONFLICT, f"data set {ds.id} is used by job {busy}, which has not finished; "
                                        "cancel it or wait for it to finish first.", job_id=busy)
    art = _artifact(session, ds)
    session.delete(ds)
    session.flush()
    if art is not None:
        delete_artifact(session, svc.store, art)
    session.commit()
    return r.Deleted(id=dataset_id, object="dataset", deleted=True)
