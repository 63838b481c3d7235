"""Content hashing, content-addressed paths, temp files and atomic writes: the one place the
artifact store, the S3 store and the blob cache take them from."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from core.service.process import HOSTNAME, pid_alive

CHUNK = 1024 * 1024
_RELPATH = re.compile(r"sha256/([0-9a-f]{2})/(\1[0-9a-f]{62})")
_HOST = HOSTNAME.replace("-", "_")  # "-" separates the parts of a temp file's name


def sha256_file(path: str | Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def relpath_for(sha256: str) -> str:
    return f"sha256/{sha256[:2]}/{sha256}"


_NAMED = re.compile(r"cache/(?:[a-z0-9_-]+/)*[0-9a-f]{64}")


def named_relpath(name: str) -> str:
    """A store path named by its caller rather than by its bytes (`cache/…/<sha256 hex>`, a cache
    entry a later job finds by its key); refuses anything else."""
    if _NAMED.fullmatch(name) is None:
        raise ValueError(f"{name!r} is not a named store path (cache/<folders>/<sha256 hex>)")
    return name


def sha256_of(relpath: str) -> str:
    """The digest a store relpath names; refuses anything that is not `sha256/ab/<hex>`."""
    m = _RELPATH.fullmatch(relpath)
    if m is None:
        raise ValueError(f"{relpath!r} is not a content-addressed artifact path (sha256/ab/<hex>)")
    return m.group(2)


def make_temp_file(folder: Path, suffix: str = "") -> Path:
    """An empty temp file in `folder` whose name carries this host and process id: a process
    killed mid-upload leaves it behind, and remove_stale_temp_files can tell its owner is gone."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=f"upload-{_HOST}-{os.getpid()}-", suffix=suffix)
    os.close(fd)
    return Path(name)


def remove_stale_temp_files(folder: Path, max_age_seconds: float = 24 * 3600) -> int:
    """Delete temp files in `folder` whose process on this host no longer runs, and any older
    than `max_age_seconds` (a folder shared between hosts); returns how many went."""
    removed = 0
    now = time.time()
    for path in folder.glob("upload-*"):
        owner = path.name.removeprefix("upload-").split("-")
        dead = len(owner) >= 3 and owner[0] == _HOST and owner[1].isdigit() and not pid_alive(int(owner[1]))
        try:
            if dead or now - path.stat().st_mtime > max_age_seconds:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue  # its owner finished with it meanwhile
    return removed


@contextmanager
def atomic_path(dest: Path, *, prefix: str = ".tmp-") -> Iterator[Path]:
    """A temp path beside `dest`; on a clean exit it replaces `dest` in one rename, so another
    process sees the whole file or none. On an error the temp file goes and `dest` is untouched."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=prefix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(dest: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `dest` through `write(fh)`, flushed to disk before the rename (atomic_path)."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        write(out)
        out.flush()
        os.fsync(out.fileno())
