"""Each caller's fair share of the server's long-lived slots: event streams and uploads.

The global limits (ROBUSTIFY_MAX_EVENT_STREAMS, ROBUSTIFY_MAX_CONCURRENT_REQUESTS) protect the
process, but alone they let one tenant take every slot: Bob's 100 streams on his own job would
make Alice's stream a 503. So each API key also has a share of its own (ROBUSTIFY_MAX_STREAMS_PER_KEY,
ROBUSTIFY_MAX_UPLOADS_PER_KEY); beyond it, that key alone gets 429 `too_many_requests` with
Retry-After, and every other key still gets its share.

Key-less callers (auth off) count as one caller: without keys every row is shared, so there
is one tenant, and a client address says nothing behind a proxy or on one machine.

A share is taken after authentication (the key is known only then) and must be given back however
the request ends. An upload gives it back in its route's `finally`; a stream outlives its route,
so `hold_until_response_ends` hands the release to the ASGI middleware that wraps the whole
response (api.guards.ConcurrencyLimit), which runs it when the response is over: stream ended,
client gone, or server stopping.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import Scope

from api.errors import ApiError
from core.errors import ErrorCode
from core.service.settings import Settings

RETRY_AFTER_SECONDS = 5  # a share frees when one of the key's own streams or uploads ends
_RELEASES = "robustify.releases"  # scope key: what to give back when the response is over
_KEYLESS = ""  # the one bucket of all callers without a key


class KeyShares:
    """At most `per_key` slots of one kind held at once by one API key (thread-safe: sync routes
    take slots from worker threads, async ones from the event loop)."""

    def __init__(self, what: str, per_key: int, setting: str) -> None:
        self.what, self.per_key, self.setting = what, per_key, setting
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, key_id: str | None) -> Callable[[], None]:
        """Take one of `key_id`'s slots, or raise 429; returns the release (idempotent)."""
        bucket = key_id or _KEYLESS
        with self._lock:
            held = self._held.get(bucket, 0)
            if held >= self.per_key:
                raise ApiError(
                    429, ErrorCode.TOO_MANY_REQUESTS,
                    f"this API key already has {held} {self.what} in progress, its share ({self.setting}="
                    f"{self.per_key}); finish or close one, then retry after {RETRY_AFTER_SECONDS} s "
                    "(Retry-After). Other keys are not affected.",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)}, limit=self.per_key)
            self._held[bucket] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self._held[bucket] - 1
                if left:
                    self._held[bucket] = left
                else:
                    del self._held[bucket]  # no entry per key ever seen: the dict stays small

        return release

    @contextmanager
    def held(self, key_id: str | None) -> Iterator[None]:
        release = self.take(key_id)
        try:
            yield
        finally:
            release()

    def in_use(self, key_id: str | None) -> int:
        with self._lock:
            return self._held.get(key_id or _KEYLESS, 0)


@dataclass(frozen=True)
class Shares:
    """The per-key shares an app enforces (kept on app.state.shares)."""

    streams: KeyShares
    uploads: KeyShares

    @classmethod
    def from_settings(cls, settings: Settings) -> Shares:
        return cls(streams=KeyShares("event streams", settings.max_streams_per_key, "ROBUSTIFY_MAX_STREAMS_PER_KEY"),
                   uploads=KeyShares("uploads", settings.max_uploads_per_key, "ROBUSTIFY_MAX_UPLOADS_PER_KEY"))


def shares(request: Request) -> Shares:
    shared: Shares = request.app.state.shares
    return shared


def hold_until_response_ends(scope: Scope, release: Callable[[], None]) -> None:
    """Give `release` to the middleware that runs it once this request's response is over."""
    scope.setdefault(_RELEASES, []).append(release)


def release_all(scope: Scope) -> None:
    """Run every release the request registered (the middleware's `finally`)."""
    for release in scope.pop(_RELEASES, ()):
        release()
