"""Who may call without an API key: decided by the addresses this process actually listens on.

`ROBUSTIFY_AUTH=auto` turns keys off only for the embedded default served on loopback
addresses. The setting that names a host says nothing about how the server was started
(`uvicorn --factory api.app:create_app --host 0.0.0.0` never reads it), so the decision looks at
the listening sockets of the running server: every asyncio or uvloop server in the process
(uvicorn, hypercorn and gunicorn's uvicorn workers all serve through one) and the local address
of the connection itself. When no listening socket can be found the server counts as exposed.

A server without keys on loopback still answers only requests addressed to a loopback name
and sent by no other web site: a page in the user's browser can neither post a form to it
(Origin check) nor read from it by DNS rebinding (Host check).
"""
from __future__ import annotations

import asyncio
import gc
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.types import Scope

from core.service.settings import Settings


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_server(obj: object) -> bool:
    # uvloop's servers (uvicorn's default loop) do not derive from asyncio.AbstractServer
    kind = type(obj)
    return isinstance(obj, asyncio.AbstractServer) or (kind.__name__ == "Server" and kind.__module__ == "uvloop.loop")


def listening_addresses() -> list[str]:
    """Host part of every socket this process listens on through an asyncio (or uvloop) server
    (a unix socket shows as its path)."""
    hosts: list[str] = []
    for obj in gc.get_objects():
        if _is_server(obj):
            for sock in obj.sockets or ():
                name = sock.getsockname()
                hosts.append(name[0] if isinstance(name, tuple) else str(name))
    return hosts


@dataclass
class AuthPolicy:
    """Settings plus the listening addresses, looked up once at the first request."""

    settings: Settings
    _loopback_only: bool | None = field(default=None, init=False)

    def loopback_only(self) -> bool:
        if self._loopback_only is None:
            hosts = listening_addresses()
            self._loopback_only = bool(hosts) and all(is_loopback(h) for h in hosts)
        return self._loopback_only

    def keys_required(self, scope: Scope) -> bool:
        decided = self.settings.auth_decided
        if decided is not None:
            return decided
        server = scope.get("server")
        if server and not is_loopback(str(server[0])):
            return True  # this connection arrived on a non-loopback address
        return not self.loopback_only()

    def local_only(self, scope: Scope) -> bool:
        """True when the server runs without keys on loopback: then Host and Origin must be local."""
        return not self.keys_required(scope) and self.loopback_only()


def foreign_host(scope: Scope) -> str | None:
    """The Host header if it names something other than this machine's loopback, else None."""
    host = header(scope, b"host")
    if host is None:
        return None
    return None if is_loopback(urlsplit(f"//{host}").hostname or "") else host


def foreign_origin(scope: Scope) -> str | None:
    """The Origin of a request sent by another web site (or by a sandboxed page), else None."""
    origin = header(scope, b"origin")
    if origin is not None:
        return None if is_loopback(urlsplit(origin).hostname or "") else origin
    if header(scope, b"sec-fetch-site") == "cross-site":
        return "cross-site"
    return None


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1").strip()
    return None
