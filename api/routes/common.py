"""Helpers the resource routers share: cursor pagination and artifact downloads."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, BinaryIO
from urllib.parse import quote

from fastapi import Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from api.errors import ApiError
from core.errors import ArtifactMissing, ErrorCode
from core.service.db import Artifact
from core.storage.artifacts import Store, artifact_relpath

_STREAM_CHUNK = 1024 * 1024

MAX_PAGE = 100
# The OpenAPI content of a download: the file's bytes.
BINARY: dict[str, Any] = {"schema": {"type": "string", "format": "binary"}}
# Ids in query parameters (cursors, filters): what new_id makes, with room for older forms.
ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
# The query parameters of a list: the page size, and the id of the last row of the page before.
PageLimit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
PageAfter = Annotated[str | None, Query(
    pattern=ID_PATTERN, description="The id of the last item of the previous page (its `next_after`); an id that "
                                    "names no item of this list is a 422 validation_error.")]
IdFilter = Annotated[str | None, Query(pattern=ID_PATTERN)]


def paginate(session: Session, stmt: Any, entity: Any, after: str | None, limit: int,
             after_filter: Any = None) -> tuple[list[Any], bool]:
    """Newest first by (created_at, id); `after` is the id of the last row of the previous page."""
    if after:
        cursor_stmt = select(entity.created_at).where(entity.id == after)
        if after_filter is not None:
            cursor_stmt = cursor_stmt.where(after_filter)
        created = session.scalar(cursor_stmt)
        if created is None:
            raise ApiError(422, ErrorCode.VALIDATION_ERROR,
                           f"unknown cursor after={after!r}: pass the last_id of a previous page.")
        stmt = stmt.where(or_(entity.created_at < created,
                              and_(entity.created_at == created, entity.id < after)))
    rows = list(session.scalars(stmt.order_by(entity.created_at.desc(), entity.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def _missing(artifact: Artifact) -> ApiError:
    return ApiError(410, ErrorCode.ARTIFACT_MISSING,
                    f"artifact {artifact.id} is recorded but its file is missing from the store; "
                    "the store may have been cleaned, or this server is not configured with the same "
                    "artifact directory or bucket as the workers.")


def _content_disposition(filename: str) -> str:
    quoted = quote(filename)
    return f"attachment; filename*=utf-8''{quoted}" if quoted != filename else f'attachment; filename="{filename}"'


def _chunks(body: BinaryIO) -> Iterator[bytes]:
    try:
        while chunk := body.read(_STREAM_CHUNK):
            yield chunk
    finally:
        body.close()


def artifact_download(request: Request, store: Store, artifact: Artifact) -> Response:
    """The artifact's bytes with ETag = sha256, Content-Disposition, and 304 on If-None-Match.

    A file on this server's disk is sent as a file (Range requests work); object storage is
    streamed through in chunks, or, with ROBUSTIFY_S3_PRESIGN_SECONDS > 0, the client is sent
    to a short-lived presigned URL (307) and the bytes bypass the API.
    """
    etag = f'"{artifact.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    inm = request.headers.get("if-none-match")
    if inm:
        tags = {t.strip().removeprefix("W/") for t in inm.split(",")}
        if "*" in tags or etag in tags:
            return Response(status_code=304, headers=headers)
    rel = artifact_relpath(artifact)
    path = store.on_disk(rel)
    if path is not None:
        return FileResponse(path, media_type=artifact.content_type, filename=artifact.filename, headers=headers)
    try:
        url = store.presigned_url(rel, filename=artifact.filename, content_type=artifact.content_type)
        if url is not None:
            if not store.exists(rel):
                raise _missing(artifact)
            return RedirectResponse(url, status_code=307, headers=headers)
        body = store.open(rel)
    except ArtifactMissing:
        raise _missing(artifact) from None
    return StreamingResponse(_chunks(body), media_type=artifact.content_type, headers={
        **headers, "Content-Length": str(artifact.size),
        "Content-Disposition": _content_disposition(artifact.filename)})
