"""Checks every request passes before routing, authentication or body parsing (ASGI middleware).

- RequestChecks: no NUL character in the path, query or headers (PostgreSQL refuses it, so it
  must never reach a query); the Host against ROBUSTIFY_ALLOWED_HOSTS whenever it is set, keys on
  or off (probes excepted); Host and Origin of a key-less server on loopback (api/binding.py);
  OPTIONS answered with the methods the path accepts.
- ConcurrencyLimit: at most ROBUSTIFY_MAX_CONCURRENT_REQUESTS requests inside the app. Others
  wait on the event loop (holding no thread and no database connection) for up to
  ROBUSTIFY_REQUEST_QUEUE_SECONDS, then get 503 + Retry-After. The limit stays below the
  thread pool's size, so a request inside the app never waits for a thread while it holds a
  connection: a burst of any size cannot lock the server up. /healthz bypasses the limit, and an
  event stream gives its slot back once its headers are sent.
- BodyLimits: a JSON body is capped at ROBUSTIFY_MAX_JSON_BYTES (413) and checked by
  api.bodies.parse_json (400/422) before authentication and before FastAPI parses it; a
  multipart upload announcing more than ROBUSTIFY_MAX_UPLOAD_BYTES is refused at once.
"""
from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl, urlsplit

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.binding import AuthPolicy, foreign_host, foreign_origin, header
from api.bodies import content_length, parse_json, too_large
from api.errors import ApiError, allowed_methods, busy, problem
from api.tenants import release_all
from core.errors import ErrorCode
from core.service.settings import Settings

# Liveness and readiness probes address a pod by its IP, which no Host list names; their public
# answers hold nothing (api/routes/ops.py), so the Host list does not apply to them.
_PROBES = frozenset({"/healthz", "/readyz"})
_WAITING_PER_SLOT = 16  # requests allowed to wait per concurrency slot; beyond that, 503 at once


def _api_error(scope: Scope, exc: ApiError) -> Response:
    return problem(exc.status, exc.code, exc.detail, instance=scope.get("path", ""), headers=exc.headers,
                   **exc.extra)


def _media_type(scope: Scope) -> str:
    return (header(scope, b"content-type") or "").split(";")[0].strip().lower()


class RequestChecks:
    def __init__(self, app: ASGIApp, auth: AuthPolicy) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if scope["method"] == "OPTIONS":
            methods = allowed_methods(scope)
            if not methods:
                refusal = problem(404, ErrorCode.NOT_FOUND, f"no route {scope['path']}; see /docs for the API.",
                                  instance=scope["path"])
                return await refusal(scope, receive, send)
            return await Response(status_code=204, headers={"Allow": ", ".join(methods)})(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> Response | None:
        path = scope["path"]
        if "\x00" in path:
            return problem(404, ErrorCode.NOT_FOUND, "no such resource: the path contains a NUL character.",
                           instance=path.replace("\x00", "\\u0000"))
        for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if "\x00" in name or "\x00" in value:
                field = name.replace("\x00", "\\u0000")
                return problem(422, ErrorCode.VALIDATION_ERROR, f"query parameter {field!r} contains a NUL character.",
                               instance=path, errors=[{"loc": ["query", field], "field": field,
                                                       "msg": "NUL character", "type": "string_pattern_mismatch"}])
        if any(b"\x00" in value for _, value in scope.get("headers", ())):
            return problem(400, ErrorCode.BAD_REQUEST, "a header contains a NUL character.", instance=path)
        host_refusal = self._host_refusal(scope, path)
        if host_refusal is not None:
            return host_refusal
        if self.auth.local_only(scope):
            origin = foreign_origin(scope)
            if origin is not None:
                return problem(403, ErrorCode.ORIGIN_NOT_ALLOWED,
                               f"a request sent by another web site ({origin}) to a server without API keys "
                               "is refused (protection against cross-site requests); call the API directly, "
                               "not from a web page, or run the server with ROBUSTIFY_AUTH=on.", instance=path)
        return None

    def _host_refusal(self, scope: Scope, path: str) -> Response | None:
        host = foreign_host(scope)  # None: no Host, or a loopback name (always answered)
        if host is None:
            return None
        allowed = self.auth.settings.allowed_hosts
        if allowed:
            if path in _PROBES or host_allowed(host, allowed):
                return None
            return problem(403, ErrorCode.HOST_NOT_ALLOWED,
                           f"this server answers requests for the hosts in ROBUSTIFY_ALLOWED_HOSTS, not {host!r} "
                           "(protection against DNS rebinding and forged links); call it by one of those names.",
                           instance=path)
        if self.auth.local_only(scope):
            return problem(403, ErrorCode.HOST_NOT_ALLOWED,
                           f"this server runs without API keys on localhost only and answers requests "
                           f"for localhost / 127.0.0.1, not {host!r} (protection against DNS rebinding); "
                           "call it as http://127.0.0.1:PORT, or run it with ROBUSTIFY_AUTH=on.",
                           instance=path)
        return None


def host_allowed(host: str, allowed: str) -> bool:
    """Whether a Host header names one of `allowed` (comma-separated names; "*.example.com" matches
    its subdomains, not example.com itself); the port does not matter."""
    try:
        name = (urlsplit(f"//{host}").hostname or "").rstrip(".")
    except ValueError:  # e.g. an unclosed "[": names no host at all
        return False
    for entry in (e.strip().lower().rstrip(".") for e in allowed.split(",")):
        if entry and (entry == "*" or entry == name or (entry.startswith("*.") and name.endswith(entry[1:]))):
            return True
    return False


class ConcurrencyLimit:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.limit = settings.max_concurrent_requests
        self.queue_seconds = settings.request_queue_seconds
        self.max_streams = settings.max_event_streams
        self.max_waiting = _WAITING_PER_SLOT * self.limit
        self.waiting = 0
        self.streams = 0
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (a test client's) gets fresh slots
            self._loop, self._slots = loop, asyncio.Semaphore(self.limit)
        assert self._slots is not None
        return self._slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            return await self.app(scope, receive, send)
        path = scope["path"]
        wants_stream = path.endswith("/events") and "text/event-stream" in (header(scope, b"accept") or "")
        if wants_stream and self.streams >= self.max_streams:
            return await busy(path, f"the server is busy: {self.streams} event streams are open "
                                    "(ROBUSTIFY_MAX_EVENT_STREAMS)")(scope, receive, send)
        slots = self._semaphore()
        if not await self._acquire(slots):
            return await busy(path, f"the server is busy: {self.limit} requests in progress and "
                                    f"{self.waiting} waiting")(scope, receive, send)
        held, streaming = True, False

        def release() -> None:
            nonlocal held
            if held:
                held = False
                slots.release()

        async def send_and_release(message: Message) -> None:
            nonlocal streaming
            if message["type"] == "http.response.start" and wants_stream and _is_event_stream(message):
                release()  # a stream lasts as long as its job: it must not hold a request slot
                streaming = True
                self.streams += 1
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            release()
            release_all(scope)  # the caller's per-key shares (api/tenants.py): the response is over
            if streaming:
                self.streams -= 1

    async def _acquire(self, slots: asyncio.Semaphore) -> bool:
        if not slots.locked():
            await slots.acquire()
            return True
        if self.waiting >= self.max_waiting:
            return False
        self.waiting += 1
        try:
            async with asyncio.timeout(self.queue_seconds):
                await slots.acquire()
            return True
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1


def _is_event_stream(message: Message) -> bool:
    return any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in message.get("headers", ()))


class BodyLimits:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        try:
            await self._checked(scope, receive, send)
        except ApiError as exc:
            await _api_error(scope, exc)(scope, receive, send)

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = _media_type(scope)
        length = content_length(header(scope, b"content-length"))
        if kind == "multipart/form-data":  # streamed to a temp file by api.bodies.read_multipart
            if length is not None and length > self.settings.max_upload_bytes:
                raise too_large(self.settings.max_upload_bytes)
            return await self.app(scope, receive, send)
        cap = self.settings.max_json_bytes
        if length is not None and length > cap:
            raise too_large(cap, "ROBUSTIFY_MAX_JSON_BYTES")
        body = await _read_capped(receive, cap)
        if body.strip() and (kind in ("", "application/json") or kind.endswith("+json")):
            parse_json(body, max_depth=self.settings.max_json_depth)
        await self.app(scope, _replay(body, receive), send)


async def _read_capped(receive: Receive, cap: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, ErrorCode.BAD_REQUEST, "the client closed the connection before the body was sent.")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > cap:
            raise too_large(cap, "ROBUSTIFY_MAX_JSON_BYTES")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
