"""A real, small filesystem for tests of a full disk: a tmpfs (mounting needs root, as CI runs)."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """`mount` (created) as a tmpfs of `size` (e.g. "64k") for the block's duration."""
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
