"""Helpers the resource routers share: cursor pagination and artifact downloads."""
from __future__ import annotations

from typing import Any

from fastapi import Request, Response
from fastapi.responses import FileResponse
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from api.errors import ApiError
from core.artifacts import ArtifactStore
from core.db import Artifact

MAX_PAGE = 100
# Ids in query parameters (cursors, filters): what new_id makes, with room for older forms.
ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


def paginate(session: Session, stmt: Any, entity: Any, after: str | None, limit: int,
             after_filter: Any = None) -> tuple[list[Any], bool]:
    """Newest first by (created_at, id); `after` is the id of the last row of the previous page."""
    if after:
        cursor_stmt = select(entity.created_at).where(entity.id == after)
        if after_filter is not None:
            cursor_stmt = cursor_stmt.where(after_filter)
        created = session.scalar(cursor_stmt)
        if created is None:
            raise ApiError(422, "validation_error", f"unknown cursor after={after!r}: pass the last_id of a previous page.")
        stmt = stmt.where(or_(entity.created_at < created,
                              and_(entity.created_at == created, entity.id < after)))
    rows = list(session.scalars(stmt.order_by(entity.created_at.desc(), entity.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def artifact_download(request: Request, store: ArtifactStore, artifact: Artifact) -> Response:
    """The artifact's bytes with ETag = sha256, Content-Disposition, and 304 on If-None-Match."""
    etag = f'"{artifact.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    inm = request.headers.get("if-none-match")
    if inm:
        tags = {t.strip().removeprefix("W/") for t in inm.split(",")}
        if "*" in tags or etag in tags:
            return Response(status_code=304, headers=headers)
    path = store.path(ArtifactStore.relpath_for(artifact.sha256))
    if not path.is_file():
        raise ApiError(410, "artifact_missing",
                       f"artifact {artifact.id} is recorded but its file is missing from the store; "
                       "the store directory may have been cleaned or not shared with this server.")
    return FileResponse(path, media_type=artifact.content_type, filename=artifact.filename, headers=headers)
