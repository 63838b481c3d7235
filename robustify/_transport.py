"""HTTP under the SDK: the API key, timeouts, retries with backoff, problems → exceptions,
sha256-verified downloads.

Retries (at most `max_retries`, waits growing exponentially with jitter, or as the server's
Retry-After says):
- a connection that could not be opened, for any request (nothing reached the server);
- a connection lost or timed out after sending, and 502/503/504/429 answers, for requests
  that may be repeated: reads, deletes, cancel, and job creation (sent with an
  Idempotency-Key, so a repeat returns the same job);
- 503 and 429 for other writes (uploads): the server refused them before doing anything.
"""
from __future__ import annotations

import email.utils
import hashlib
import logging
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx

from robustify.errors import APIConnectionError, APITimeoutError, ChecksumMismatchError, NotFoundError, error_for

log = logging.getLogger("robustify.client")

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "PUT"})
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_REFUSED_STATUSES = frozenset({429, 503})  # answers that mean the request was not acted on
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class Transport:
    def __init__(self, base_url: str, api_key: str | None, *, timeout: float | httpx.Timeout,
                 max_retries: int, backoff_base: float = 0.5, backoff_max: float = 8.0,
                 http_client: httpx.Client | None = None, user_agent: str = "robustify-python") -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max(0, max_retries)
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        headers = {"User-Agent": user_agent}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout, connect=min(10.0, timeout))
        self._owns_http = http_client is None
        # redirects: a download may answer 307 to a presigned object-storage URL (httpx drops the
        # Authorization header on the way to another host, as it must)
        self.http = http_client or httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                                follow_redirects=True)
        if not self._owns_http:
            self.http.headers.update(headers)

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    # ------------------------------------------------------------------ retries
    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2.0 ** attempt) * random.uniform(0.5, 1.0)
        after = response.headers.get("retry-after") if response is not None else None
        if after:
            if after.strip().isdigit():
                delay = max(delay, float(after))
            else:
                when = email.utils.parsedate_to_datetime(after) if after else None
                if when is not None:
                    delay = max(delay, when.timestamp() - time.time())
        return max(0.0, min(delay, 60.0))

    def _retryable(self, attempt: int, repeatable: bool, exc: Exception | None,
                   response: httpx.Response | None) -> bool:
        if attempt >= self.max_retries:
            return False
        if exc is not None:
            return isinstance(exc, _NOT_SENT) or (repeatable and isinstance(exc, httpx.TransportError))
        assert response is not None
        return response.status_code in (_RETRY_STATUSES if repeatable else _REFUSED_STATUSES)

    def _send(self, method: str, path: str, *, stream: bool, repeatable: bool | None,
              files: Callable[[], dict[str, Any]] | None, **kw: Any) -> httpx.Response:
        repeatable = method.upper() in _SAFE_METHODS if repeatable is None else repeatable
        attempt = 0
        while True:
            opened: dict[str, Any] = files() if files else {}
            try:
                request = self.http.build_request(method, path, files=opened or None, **kw)
                response = self.http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if not self._retryable(attempt, repeatable, exc, None):
                    raise self._connection_error(exc) from None
                wait, why = self._delay(attempt, None), f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400 or not self._retryable(attempt, repeatable, None, response):
                    if response.status_code >= 400:
                        raise self._problem(response)
                    return response
                wait, why = self._delay(attempt, response), f"HTTP {response.status_code}"
                response.close()
            finally:
                for part in opened.values():
                    fh = part[1] if isinstance(part, tuple) else part
                    if hasattr(fh, "close"):
                        fh.close()
            attempt += 1
            log.info("retrying %s %s in %.2f s (retry %d of %d): %s", method, path, wait, attempt,
                     self.max_retries, why)
            time.sleep(wait)

    def _connection_error(self, exc: httpx.TransportError) -> APIConnectionError:
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(f"the server at {self.base_url} did not answer in time ({type(exc).__name__})")
        return APIConnectionError(f"cannot reach the server at {self.base_url} ({type(exc).__name__}: {exc}); "
                                  "is it running (`robustify serve`)? Check the URL (ROBUSTIFY_URL).")

    @staticmethod
    def _problem(response: httpx.Response) -> Exception:
        if not response.is_closed:
            response.read()
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {"detail": f"HTTP {response.status_code}: {response.text[:300]}", "code": "error"}
        err = error_for(response.status_code, body, dict(response.headers))
        if response.status_code == 401:
            err.message += ("\n  pass an API key (Client(api_key=…) or ROBUSTIFY_API_KEY); "
                            "create one with `robustify keys create NAME`.")
            err.args = (err.message,)
        return err

    # ------------------------------------------------------------------ calls
    def request(self, method: str, path: str, *, repeatable: bool | None = None,
                files: Callable[[], dict[str, Any]] | None = None, **kw: Any) -> httpx.Response:
        return self._send(method, path, stream=False, repeatable=repeatable, files=files, **kw)

    def json(self, method: str, path: str, **kw: Any) -> Any:
        return self.request(method, path, **kw).json()

    @contextmanager
    def stream(self, method: str, path: str, **kw: Any) -> Iterator[httpx.Response]:
        response = self._send(method, path, stream=True, repeatable=None, files=None, **kw)
        try:
            yield response
        finally:
            response.close()

    def download(self, path: str, target: Path, *, default_name: str, expected_sha256: str | None = None,
                 missing_ok: bool = False) -> Path | None:
        """Save a file (into `target` if it is a folder), checking its sha256 against the ETag the
        server sends (and `expected_sha256`). A broken transfer is retried from the start."""
        for attempt in range(self.max_retries + 1):
            try:
                return self._download_once(path, target, default_name, expected_sha256, missing_ok)
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise self._connection_error(exc) from None
                time.sleep(self._delay(attempt, None))
        raise AssertionError("unreachable")

    def _download_once(self, path: str, target: Path, default_name: str, expected: str | None,
                       missing_ok: bool) -> Path | None:
        try:
            with self.stream("GET", path) as response:
                dest = target / filename_of(response, default_name) if target.is_dir() else target
                partial = dest.with_name(dest.name + ".part")
                digest = hashlib.sha256()
                with open(partial, "wb") as fh:
                    for chunk in response.iter_bytes():
                        digest.update(chunk)
                        fh.write(chunk)
                # the API's ETag is the sha256; after a redirect, the bucket's own ETag (an MD5) is not
                first = response.history[0] if response.history else response
                etag = first.headers.get("etag", "").removeprefix("W/").strip('"')
        except NotFoundError:
            if missing_ok:
                return None
            raise
        got = digest.hexdigest()
        for name, want in (("ETag", etag), ("listed sha256", expected)):
            if want and want != got:
                partial.unlink(missing_ok=True)
                raise ChecksumMismatchError(f"{path}: the download's sha256 {got} is not the {name} {want}; "
                                            "the transfer was corrupted: download again.")
        partial.replace(dest)
        return dest


def filename_of(response: httpx.Response, default: str) -> str:
    """The name in Content-Disposition: filename*=utf-8''<percent-encoded> (RFC 6266) or filename="..."."""
    header = response.headers.get("content-disposition", "")
    match = re.search(r"filename\*=utf-8''([^;]+)", header, re.IGNORECASE)
    if match:
        name = unquote(match.group(1).strip())
    else:
        match = re.search(r'filename="?([^";]+)"?', header)
        name = match.group(1) if match else default
    return Path(name).name or default
