"""A worker's local copies of stored files, keyed by sha256, within a size bound.

With object storage, a worker reads a model or a data set from the bucket once and keeps it
at `<root>/ab/<sha256>`; the next job on the same inputs finds it on local disk. A copy is
checked against its sha256 before it enters the cache, so a damaged download is never used.
When the cache grows past its bound, the least recently used copies go first (a use touches
the file's mtime). Copies used in the last `grace_seconds` stay even over the bound: another
process sharing the folder may have just been handed the path and not opened it yet.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from core.errors import ArtifactCorrupt
from core.storage.files import atomic_path, sha256_file


class BlobCache:
    def __init__(self, root: str | Path, max_bytes: int, *, grace_seconds: float = 60.0) -> None:
        self.root = Path(root).resolve()
        self.max_bytes = max_bytes
        self.grace_seconds = grace_seconds

    def path_for(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def get(self, sha256: str, fetch: Callable[[Path], None]) -> Path:
        """The cached copy of `sha256`; on a miss `fetch(dest)` writes the bytes to dest first."""
        dest = self.path_for(sha256)
        if dest.is_file():
            os.utime(dest)  # most recently used
            return dest
        with atomic_path(dest, prefix=".fetch-") as tmp:
            fetch(tmp)
            got, _ = sha256_file(tmp)
            if got != sha256:
                raise ArtifactCorrupt(
                    f"the stored file {sha256} arrived with sha256 {got}: the object in storage is damaged or was "
                    "replaced. Upload the model or data set again (or restore the object from a backup).")
        self.evict(keep=dest)
        return dest

    def discard(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)

    def entries(self) -> list[Path]:
        if not self.root.exists():
            return []
        return [p for p in self.root.glob("??/*") if p.is_file() and not p.name.startswith(".")]

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.entries())

    def evict(self, keep: Path | None = None) -> None:
        """Drop least recently used copies until the cache fits its bound."""
        stats = []
        for p in self.entries():
            try:
                stats.append((p, p.stat()))
            except FileNotFoundError:  # another process evicted it meanwhile
                continue
        total = sum(st.st_size for _, st in stats)
        now = time.time()
        for p, st in sorted(stats, key=lambda e: e[1].st_mtime):
            if total <= self.max_bytes:
                break
            if p == keep or now - st.st_mtime < self.grace_seconds:
                continue
            p.unlink(missing_ok=True)
            total -= st.st_size
