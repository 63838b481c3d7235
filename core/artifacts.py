"""A content-addressed artifact store on a directory, and the rows that describe its files.

Files live at `<root>/sha256/ab/abcdef…` (the first two hex digits fan the folder out), so
the same bytes are stored once however many rows point at them. Writes are atomic: a temp
file in the target folder, then os.replace, so a reader never sees half a file.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.db import Artifact, new_id
from core.process import HOSTNAME, pid_alive

_CHUNK = 1024 * 1024
_HOST = HOSTNAME.replace("-", "_")  # "-" separates the parts of a temp file's name


def sha256_file(path: str | Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class ArtifactStore:
    """Content-addressed files under `root`; relpaths are `sha256/ab/<hex>`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    @staticmethod
    def relpath_for(sha256: str) -> str:
        return f"sha256/{sha256[:2]}/{sha256}"

    def path(self, relpath: str) -> Path:
        """Absolute path of a stored file; refuses paths that leave the store."""
        full = (self.root / relpath).resolve()
        if self.root not in full.parents:
            raise ValueError(f"artifact path {relpath!r} is outside the store")
        return full

    def exists(self, relpath: str) -> bool:
        return self.path(relpath).is_file()

    def temp_file(self, suffix: str = "") -> Path:
        """An empty temp file inside the store (same filesystem, so put_file can rename it).

        Its name carries this host and process id: a process killed mid-upload leaves it behind,
        and remove_stale_temp_files can tell that its owner is gone."""
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix=f"upload-{_HOST}-{os.getpid()}-", suffix=suffix)
        os.close(fd)
        return Path(name)

    def remove_stale_temp_files(self, max_age_seconds: float = 24 * 3600) -> int:
        """Delete temp files whose process on this host no longer runs, and any older than
        `max_age_seconds` (a store shared between hosts); returns how many went."""
        removed = 0
        now = time.time()
        for path in (self.root / "tmp").glob("upload-*"):
            owner = path.name.removeprefix("upload-").split("-")
            dead = len(owner) >= 3 and owner[0] == _HOST and owner[1].isdigit() and not pid_alive(int(owner[1]))
            try:
                if dead or now - path.stat().st_mtime > max_age_seconds:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # its owner finished with it meanwhile
        return removed

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
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, dest)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return sha, size, rel

    def put_bytes(self, data: bytes) -> tuple[str, int, str]:
        sha = hashlib.sha256(data).hexdigest()
        rel = self.relpath_for(sha)
        dest = self.path(rel)
        if dest.is_file():
            return sha, len(data), rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, dest)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return sha, len(data), rel

    def open(self, relpath: str) -> BinaryIO:
        return open(self.path(relpath), "rb")

    def delete(self, relpath: str) -> None:
        """Remove a stored file (callers check first that no other row uses it)."""
        self.path(relpath).unlink(missing_ok=True)

    def files(self) -> list[Path]:
        """Every stored file and leftover temp file (tests use it to prove nothing was kept)."""
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.rglob("*") if p.is_file())


def artifact_relpath(artifact: Artifact) -> str:
    return ArtifactStore.relpath_for(artifact.sha256)


def record_artifact(
    session: Session,
    store: ArtifactStore,
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


def delete_artifact(session: Session, store: ArtifactStore, artifact: Artifact) -> None:
    """Delete a row and COMMIT (with the caller's pending changes); then remove the file when
    no other row holds the same bytes. Committing first means a failed commit loses no file."""
    sha = artifact.sha256
    session.delete(artifact)
    session.flush()
    others = session.scalar(select(func.count()).select_from(Artifact).where(Artifact.sha256 == sha))
    session.commit()
    if not others:
        store.delete(ArtifactStore.relpath_for(sha))


def commit_or_unstore(session: Session, store: ArtifactStore, sha256: str) -> None:
    """Commit a transaction that recorded a file just put into the store; if the commit fails,
    take the file out again unless a committed row holds the same bytes (no orphan is left)."""
    try:
        session.commit()
    except BaseException:
        session.rollback()
        try:
            others = session.scalar(select(func.count()).select_from(Artifact).where(Artifact.sha256 == sha256))
        except SQLAlchemyError:
            others = 1  # the database cannot say (it is down): keeping a file is safer than losing one
        if not others:
            store.delete(ArtifactStore.relpath_for(sha256))
        raise
