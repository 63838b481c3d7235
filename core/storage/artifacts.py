"""The content-addressed artifact store, and the rows that describe its files.

Every stored file is named by its bytes: `sha256/ab/abcdef…` (the first two hex digits fan a
folder out), so the same bytes are stored once however many rows point at them. Two backends
keep these files behind one interface (`Store`): a directory (`ArtifactStore`, the embedded
default, also right for a shared filesystem) and S3-compatible object storage
(`core.storage.s3.S3ArtifactStore`), chosen by settings in `open_store`. Writes are atomic in
both: a reader never sees half a file. Besides them a store keeps entries its callers name
(`put_named`, `get_named`: `cache/…/<key>`, the fine-tunes' measurement cache, worker/measurecache.py),
which no row references and which may be deleted at any time.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.errors import ArtifactMissing
from core.service.db import Artifact, new_id
from core.storage.files import (
    CHUNK,
    make_temp_file,
    named_relpath,
    relpath_for,
    remove_stale_temp_files,
    sha256_file,
    write_atomic,
)

if TYPE_CHECKING:
    from core.service.settings import Settings

class Store(Protocol):
    """What the API and the workers need of an artifact store, whatever keeps the bytes."""

    def temp_file(self, suffix: str = "") -> Path:
        """An empty local temp file that put_file(move=True) can consume cheaply."""

    def remove_stale_temp_files(self, max_age_seconds: float = 24 * 3600) -> int:
        """Delete temp files left by processes that no longer run; returns how many went."""

    def put_file(self, src_path: str | Path, *, move: bool = False) -> tuple[str, int, str]:
        """Store a file's bytes (streamed, never held in memory); returns (sha256, size, relpath)."""

    def put_bytes(self, data: bytes) -> tuple[str, int, str]: ...

    def exists(self, relpath: str) -> bool: ...

    def open(self, relpath: str) -> BinaryIO:
        """A reader of the stored bytes; ArtifactMissing when they are gone."""

    def delete(self, relpath: str) -> None: ...

    def local_path(self, relpath: str) -> Path:
        """A file on this machine with the stored bytes (a verified cached copy for remote stores)."""

    def on_disk(self, relpath: str) -> Path | None:
        """The stored file itself when this store keeps it on a local disk, else None."""

    def presigned_url(self, relpath: str, *, filename: str, content_type: str) -> str | None:
        """A short-lived URL a client can download from directly, or None (serve through the API)."""

    def check(self) -> dict[str, Any]:
        """Readiness: {"ok": bool, ...}; never raises."""

    def put_named(self, name: str, data: bytes) -> None:
        """Store bytes under a caller's name (`cache/…/<hex>`, files.named_relpath), replacing
        what was there, atomically: a reader sees the old bytes or the new, never a part."""

    def get_named(self, name: str) -> bytes | None:
        """The bytes stored under `name`, or None when there are none."""


class ArtifactStore:
    """Content-addressed files under a local (or shared, mounted) directory `root`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    relpath_for = staticmethod(relpath_for)

    def path(self, relpath: str) -> Path:
        """Absolute path of a stored file; refuses paths that leave the store."""
        full = (self.root / relpath).resolve()
        if self.root not in full.parents:
            raise ValueError(f"artifact path {relpath!r} is outside the store")
        return full

    def exists(self, relpath: str) -> bool:
        return self.path(relpath).is_file()

    def temp_file(self, suffix: str = "") -> Path:
        """An empty temp file inside the store (same filesystem, so put_file can rename it)."""
        return make_temp_file(self.root / "tmp", suffix)

    def remove_stale_temp_files(self, max_age_seconds: float = 24 * 3600) -> int:
        return remove_stale_temp_files(self.root / "tmp", max_age_seconds)

    def put_file(self, src_path: str | Path, *, move: bool = False) -> tuple[str, int, str]:
        """Store a file's bytes; returns (sha256, size, relpath). `move` consumes src_path."""
        src = Path(src_path)
        sha, size = sha256_file(src)
        rel = self.relpath_for(sha)
        dest = self.path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_file():
            if move:
                src.unlink(missing_ok=True)
            return sha, size, rel
        if move:
            os.replace(src, dest)  # callers put their temp files inside the store: same filesystem
            return sha, size, rel
        with open(src, "rb") as fh:
            write_atomic(dest, lambda out: shutil.copyfileobj(fh, out, CHUNK))
        return sha, size, rel

    def put_bytes(self, data: bytes) -> tuple[str, int, str]:
        sha = hashlib.sha256(data).hexdigest()
        rel = self.relpath_for(sha)
        dest = self.path(rel)
        if dest.is_file():
            return sha, len(data), rel
        write_atomic(dest, lambda out: out.write(data))
        return sha, len(data), rel

    def open(self, relpath: str) -> BinaryIO:
        try:
            return open(self.path(relpath), "rb")
        except FileNotFoundError:
            raise _missing(relpath, f"the directory {self.root}") from None

    def local_path(self, relpath: str) -> Path:
        path = self.path(relpath)
        if not path.is_file():
            raise _missing(relpath, f"the directory {self.root}")
        return path

    def on_disk(self, relpath: str) -> Path | None:
        path = self.path(relpath)
        return path if path.is_file() else None

    def presigned_url(self, relpath: str, *, filename: str, content_type: str) -> str | None:
        return None

    def check(self) -> dict[str, Any]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.temp_file(".probe")
            probe.unlink()
            return {"ok": True, "backend": "directory"}
        except OSError as exc:
            return {"ok": False, "backend": "directory", "error": f"{type(exc).__name__}: {exc}"[:500]}

    def delete(self, relpath: str) -> None:
        """Remove a stored file (callers check first that no other row uses it)."""
        self.path(relpath).unlink(missing_ok=True)

    def put_named(self, name: str, data: bytes) -> None:
        write_atomic(self.path(named_relpath(name)), lambda out: out.write(data))

    def get_named(self, name: str) -> bytes | None:
        try:
            return self.path(named_relpath(name)).read_bytes()
        except FileNotFoundError:
            return None

    def files(self) -> list[Path]:
        """Every stored file and leftover temp file (tests use it to prove nothing was kept)."""
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.rglob("*") if p.is_file())


def _missing(relpath: str, where: str) -> ArtifactMissing:
    return ArtifactMissing(
        f"the stored file {relpath} is recorded but missing from {where}; it may have been cleaned up, or this "
        "process is not configured with the same artifact store as the others (check ROBUSTIFY_ARTIFACT_DIR "
        "or ROBUSTIFY_S3_BUCKET / ROBUSTIFY_S3_PREFIX). Upload the file again.")


def open_store(settings: Settings) -> Store:
    """The store that settings choose: an S3 bucket when ROBUSTIFY_S3_BUCKET is set, else a directory."""
    if settings.s3_bucket:
        from core.storage.s3 import S3ArtifactStore  # boto3 only where object storage is used

        return S3ArtifactStore.from_settings(settings)
    store = ArtifactStore(settings.resolved_artifact_dir)
    store.root.mkdir(parents=True, exist_ok=True)
    return store


def artifact_relpath(artifact: Artifact) -> str:
    return relpath_for(artifact.sha256)


def record_artifact(
    session: Session,
    store: Store,
    *,
    kind: str,
    filename: str,
    content_type: str,
    src_path: str | Path | None = None,
    content: bytes | None = None,
    move: bool = False,
    owner_key_id: str | None = None,
    job_id: str | None = None,
    epoch: int | None = None,
    is_best: bool | None = None,
    data: dict | None = None,
) -> Artifact:
    """Store a file (src_path) or bytes (content) and add its Artifact row (the caller commits).

    `data` is the row's JSON (a checkpoint's metrics); bytes passed as `data` are taken as content.
    """
    if isinstance(data, (bytes, bytearray)) and content is None and src_path is None:
        content, data = bytes(data), None
    if (src_path is None) == (content is None):
        raise ValueError("give exactly one of src_path or content")
    if src_path is not None:
        sha, size, _ = store.put_file(src_path, move=move)
    else:
        sha, size, _ = store.put_bytes(content)  # type: ignore[arg-type]
    return add_artifact_row(session, sha256=sha, size=size, kind=kind, filename=filename,
                            content_type=content_type, owner_key_id=owner_key_id, job_id=job_id, epoch=epoch,
                            is_best=is_best, data=data)


def add_artifact_row(session: Session, *, sha256: str, size: int, kind: str, filename: str, content_type: str,
                     owner_key_id: str | None = None, job_id: str | None = None, epoch: int | None = None,
                     is_best: bool | None = None, data: dict | None = None) -> Artifact:
    """The row of a file already in the store (the caller commits). Storing first and recording
    after lets a writer retry the database part alone."""
    row = Artifact(
        id=new_id("art"), owner_key_id=owner_key_id, job_id=job_id, kind=kind, sha256=sha256,
        size=size, content_type=content_type, filename=filename, epoch=epoch, is_best=is_best,
        data=data,
    )
    session.add(row)
    session.flush()
    return row


def record_same_bytes(session: Session, source: Artifact, *, kind: str, owner_key_id: str | None = None,
                      filename: str | None = None, job_id: str | None = None) -> Artifact:
    """Another row over bytes already stored (content addressing: nothing is copied or uploaded,
    and each row keeps the bytes alive until the last one is deleted). The caller commits."""
    row = Artifact(id=new_id("art"), owner_key_id=owner_key_id, job_id=job_id, kind=kind, sha256=source.sha256,
                   size=source.size, content_type=source.content_type, filename=filename or source.filename)
    session.add(row)
    session.flush()
    return row


def delete_artifact(session: Session, store: Store, artifact: Artifact) -> None:
    """Delete a row and COMMIT (with the caller's pending changes); then remove the file when
    no other row holds the same bytes. Committing first means a failed commit loses no file."""
    sha = artifact.sha256
    session.delete(artifact)
    session.flush()
    others = session.scalar(select(func.count()).select_from(Artifact).where(Artifact.sha256 == sha))
    session.commit()
    if not others:
        store.delete(relpath_for(sha))


def commit_or_unstore(session: Session, store: Store, sha256: str, check: Callable[[], object] | None = None) -> None:
    """Commit a transaction that recorded a file just put into the store; if the commit fails,
    take the file out again unless a committed row holds the same bytes (no orphan is left).

    `check` runs after a flush and before the commit: the route builds and serialises its answer
    there, so that a row the API could not answer with is never committed (it would break every
    later listing of the caller's rows)."""
    try:
        if check is not None:
            session.flush()
            check()
        session.commit()
    except BaseException:
        session.rollback()
        try:
            others = session.scalar(select(func.count()).select_from(Artifact).where(Artifact.sha256 == sha256))
        except SQLAlchemyError:
            others = 1  # the database cannot say (it is down): keeping a file is safer than losing one
        if not others:
            store.delete(relpath_for(sha256))
        raise
