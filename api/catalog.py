"""Names of the architecture families for GET /v1/architectures, with no torch in the API process.

Importing timm or torchvision to list their names would put torch into the API process (measured
on the shared 2-core machine: after `import api.app` (76 MB resident), `import timm` takes 5-12 s
and brings the process to 708-753 MB). Instead a family's names come from a subprocess,
`python -m core.architectures.catalog <family>`, once; they are kept in memory and in
<data_dir>/cache, keyed by the installed package versions, so a restarted server reads them back
without a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

from api.errors import ApiError
from core.config import FAMILY_PREFIXES

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_FAMILY = "builtin"
LISTED_FAMILIES: tuple[str, ...] = tuple(prefix.rstrip(":") for prefix in FAMILY_PREFIXES)


def _version_key(family: str) -> str:
    try:
        return f"{family}-{metadata.version(family)}"   # each listed family is the package of that name
    except metadata.PackageNotFoundError:
        return f"{family}-missing"


class ArchitectureCatalog:
    """Each listed family's names, computed once (subprocess) and cached (memory, then disk)."""

    def __init__(self, cache_dir: Path, timeout: float = 300.0) -> None:
        self.cache_dir = cache_dir
        self.timeout = timeout
        self._names: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def names(self, family: str) -> list[dict[str, Any]]:
        with self._lock:  # one subprocess per family even when requests arrive together
            if family not in self._names:
                self._names[family] = self._load(family)
            return self._names[family]

    def _load(self, family: str) -> list[dict[str, Any]]:
        path = self.cache_dir / f"architectures-{_version_key(family)}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # not cached yet (or a damaged cache file): list the names afresh
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        try:
            out = subprocess.run([sys.executable, "-m", "core.architectures.catalog", family], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=self.timeout, check=True)
            names = json.loads(out.stdout)
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            tail = getattr(exc, "stderr", "") or ""
            raise ApiError(503, "catalog_unavailable",
                           f"listing the {family} architectures failed ({type(exc).__name__}: {tail[-300:] or exc}); "
                           "retry, or check that the package is installed on the server.") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(names))
        os.replace(tmp, path)  # atomic: another server process may read it at the same time
        return names
