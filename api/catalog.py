"""Names of the architecture families for GET /v1/architectures, with no torch in the API process
and no request waiting for them.

Importing timm or torchvision to list their names would put torch into the API process (measured
on the shared 2-core machine: after `import api.app` (76 MB resident), `import timm` takes 5-12 s
and brings the process to 708-753 MB). Instead a background thread runs
`python -m core.engine.architectures.catalog timm torchvision robustbench` the first time a family's
names are needed: one interpreter lists every family not known yet, in about the time of one
(measured here: 6.6 s for the three together, 6.4 s for timm alone, 18.5 s one by one; they all
import torch, and robustbench imports timm). Meanwhile the route answers 503
`catalog_building` with Retry-After; a failed listing answers 503 `catalog_unavailable` with the
reason, and is tried again after FAILURE_HOLD_SECONDS. The names are kept in memory and in
<data_dir>/cache, keyed by the installed package versions, so a restarted server reads them back
at once.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from api.errors import ApiError
from core.engine.architecture_names import FAMILIES, parse_architecture
from core.errors import ErrorCode

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_FAMILY = "builtin"
LISTED_FAMILIES: tuple[str, ...] = FAMILIES
LIST_COMMAND: tuple[str, ...] = (sys.executable, "-m", "core.engine.architectures.catalog")
# What a first listing takes (torch, timm, torchvision, robustbench imported once): the Retry-After
# of a 503 catalog_building until a listing on this server has been timed.
EXPECTED_BUILD_SECONDS = 15.0
FAILURE_HOLD_SECONDS = 30.0  # a failed listing is reported, not retried, for this long


def _version_key(family: str) -> str:
    try:
        return f"{family}-{metadata.version(family)}"   # each listed family is the package of that name
    except metadata.PackageNotFoundError:
        return f"{family}-missing"


class ArchitectureCatalog:
    """Each listed family's names, listed once by a background subprocess and cached (memory, disk)."""

    def __init__(self, cache_dir: Path, timeout: float = 300.0, command: Sequence[str] = LIST_COMMAND,
                 families: Sequence[str] = LISTED_FAMILIES) -> None:
        self.cache_dir = cache_dir
        self.timeout = timeout
        self.command = tuple(command)
        self.families = tuple(families)
        self._names: dict[str, list[dict[str, Any]]] = {}
        self._failed: dict[str, tuple[float, str]] = {}   # family -> (monotonic time, why)
        self._pending: list[str] = []                     # asked for, waiting for the builder
        self._building: set[str] = set()
        self._started_at = 0.0                            # of the listing running now
        self._took = EXPECTED_BUILD_SECONDS
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._closed = False

    # ------------------------------------------------------------------ for the route
    def names(self, families: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """{family: names} at once, or ApiError 503 while one of them is being listed (the first
        call for a family starts its listing) or after its listing failed."""
        with self._cond:
            waiting = [f for f in families if f not in self._names and not self._from_disk(f)]
            now = time.monotonic()
            for family in waiting:
                failed_at, why = self._failed.get(family, (-math.inf, ""))
                if now - failed_at < FAILURE_HOLD_SECONDS:
                    raise ApiError(503, ErrorCode.CATALOG_UNAVAILABLE,
                                   f"listing the {family} architectures failed ({why}); retry later, or check "
                                   "that the package is installed on the server.",
                                   headers={"Retry-After": str(math.ceil(FAILURE_HOLD_SECONDS - (now - failed_at)))})
            if waiting:
                self._request(waiting)
                left = max(2, math.ceil(self._took - (now - self._started_at))) if self._building else \
                    math.ceil(self._took)
                raise ApiError(503, ErrorCode.CATALOG_BUILDING,
                               f"the server is listing the {', '.join(waiting)} architectures (a one-time step "
                               f"after an install or upgrade); retry in {left} s.",
                               headers={"Retry-After": str(left)}, families=waiting)
            return {f: self._names[f] for f in families}

    def listed(self, family: str) -> list[dict[str, Any]] | None:
        """The family's names if known now (memory or disk), else None; never waits and never
        raises: a registration checks a name against them when they are known (unlisted_name_problem),
        and a first call starts their listing for the next one."""
        with self._cond:
            if family in self._names or self._from_disk(family):
                return self._names[family]
            failed_at, _ = self._failed.get(family, (-math.inf, ""))
            if time.monotonic() - failed_at >= FAILURE_HOLD_SECONDS:
                self._request([family])
            return None

    def close(self) -> None:
        """Stop the builder (the server is stopping): a listing still running is killed."""
        with self._cond:
            self._closed = True
            proc = self._proc
            self._cond.notify_all()
        if proc is not None and proc.poll() is None:
            proc.kill()

    # ------------------------------------------------------------------ inside
    def _path(self, family: str) -> Path:
        return self.cache_dir / f"architectures-{_version_key(family)}.json"

    def _from_disk(self, family: str) -> bool:
        try:
            self._names[family] = json.loads(self._path(family).read_text())
        except (OSError, ValueError):
            return False  # not cached yet (or a damaged cache file): list the names afresh
        return True

    def _request(self, families: list[str]) -> None:
        """Have `families` listed, with every other family not known yet (in the same subprocess)."""
        now = time.monotonic()
        held = {f for f, (failed_at, _) in self._failed.items() if now - failed_at < FAILURE_HOLD_SECONDS}
        also = [f for f in self.families if f not in self._names and f not in held and not self._from_disk(f)]
        self._pending += [f for f in dict.fromkeys([*families, *also])
                          if f not in self._building and f not in self._pending]
        if self._thread is None:
            self._thread = threading.Thread(target=self._build_loop, name="architecture-catalog", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def _build_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch, self._pending = self._pending, []
                self._building = set(batch)
                self._started_at = time.monotonic()
            results = self._list(batch)
            with self._cond:
                for family, result in results.items():
                    if isinstance(result, list):
                        self._names[family] = result
                        self._failed.pop(family, None)
                    else:
                        self._failed[family] = (time.monotonic(), str(result))
                self._took = time.monotonic() - self._started_at
                self._building = set()
                self._cond.notify_all()

    def _list(self, families: list[str]) -> dict[str, list[dict[str, Any]] | str]:
        """Each family's names (written to the cache), or why listing it failed."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        try:
            with self._cond:
                if self._closed:
                    return dict.fromkeys(families, "the server is stopping")
                proc = self._proc = subprocess.Popen([*self.command, *families], cwd=ROOT, env=env,
                                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                     stderr=subprocess.PIPE, text=True)
            out, err = proc.communicate(timeout=self.timeout)
            if proc.returncode != 0:
                raise ChildProcessError(f"exit status {proc.returncode}: {err.strip()[-300:]}")
            listed = json.loads(out)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return dict.fromkeys(families, f"no answer within {self.timeout:.0f} s")
        except (OSError, ValueError, ChildProcessError) as exc:
            return {f: f"{type(exc).__name__}: {exc}" for f in families}
        finally:
            with self._cond:
                self._proc = None
        results: dict[str, list[dict[str, Any]] | str] = {}
        for family in families:
            result = listed.get(family, "not listed")
            if isinstance(result, list):
                self._save(family, result)
            results[family] = result if isinstance(result, list) else str(result)
        return results

    def _save(self, family: str, names: list[dict[str, Any]]) -> None:
        path = self._path(family)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(names))
        os.replace(tmp, path)  # atomic: another server process may read it at the same time


# A family's model names: letters, digits, "_", "-" and "." (timm's pretrained tag, as in
# resnet18.a1_in1k); never a path ("/", "..") nor anything to escape.
FAMILY_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,179}\Z")


def unlisted_name_problem(catalog: ArchitectureCatalog, architecture: str) -> str | None:
    """Why `architecture` (family:name) cannot be one of its family's models, with close names;
    None when it is, or when the family's names are not listed yet (the worker checks it then)."""
    parsed = parse_architecture(architecture)
    if parsed.family is None:
        return None
    if not FAMILY_MODEL_NAME.match(parsed.name) or ".." in parsed.name:
        return (f"{architecture!r} is not a {parsed.family} model name: a name is letters, digits, '_', '-' "
                "and '.', with no '/' or '..'")
    names = catalog.listed(parsed.family)
    if names is None:
        return None
    prefix = f"{parsed.family}:"
    known = [str(entry["id"]).removeprefix(prefix) for entry in names]
    # timm reads "<architecture>.<pretrained tag>" as its architecture (timm.is_model does too)
    wanted = parsed.name.partition(".")[0] if parsed.family == "timm" else parsed.name
    if wanted in known:
        return None
    close = difflib.get_close_matches(wanted.lower() if parsed.family != "robustbench" else wanted, known,
                                      n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return (f"{parsed.family} has no model {parsed.name!r}.{hint} "
            f"GET /v1/architectures?family={parsed.family}&q=<part of a name> lists its names.")
