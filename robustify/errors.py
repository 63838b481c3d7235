"""The SDK's exceptions. Each carries a stable `code`: the server's problem code for an HTTP
error (e.g. "model_not_ready", "validation_error"), or the SDK's own for what happened on the
way ("connection_error", "timeout", "checksum_mismatch", ...).

    RobustifyError
    ├── APIConnectionError          the server could not be reached (after the retries)
    │   └── APITimeoutError
    ├── APIError                    the server answered with a problem (RFC 9457)
    │   ├── BadRequestError 400, AuthenticationError 401, PermissionDeniedError 403,
    │   │   NotFoundError 404, ConflictError 409, GoneError 410, PayloadTooLargeError 413,
    │   │   UnsupportedMediaTypeError 415, ValidationError 422, RateLimitError 429
    │   └── ServerError 5xx
    │       └── ServiceUnavailableError 503
    ├── ChecksumMismatchError       a download's sha256 is not the one the server announced
    ├── WaitTimeoutError            wait() gave up before the job or model finished
    └── WebhookVerificationError    (robustify.webhooks) a received webhook is not authentic
"""
from __future__ import annotations

from typing import Any


class RobustifyError(Exception):
    """Base of every error the SDK raises."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class APIConnectionError(RobustifyError):
    code = "connection_error"


class APITimeoutError(APIConnectionError):
    code = "timeout"


class APIError(RobustifyError):
    """A problem response. `problem` is the whole RFC 9457 body; `errors` the per-field list of a 422."""

    def __init__(self, status: int, problem: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.problem = problem
        self.detail: str = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
        self.errors: list[dict[str, Any]] = list(problem.get("errors") or [])
        self.headers = headers or {}
        code = problem.get("code") or "error"
        text = f"{self.detail} [{code}, HTTP {status}]"
        for err in self.errors:
            text += f"\n  {err.get('field') or '.'.join(map(str, err.get('loc', [])))}: {err.get('msg')}"
        super().__init__(text, code=str(code))


class BadRequestError(APIError): ...
class AuthenticationError(APIError): ...
class PermissionDeniedError(APIError): ...
class NotFoundError(APIError): ...
class ConflictError(APIError): ...
class GoneError(APIError): ...
class PayloadTooLargeError(APIError): ...
class UnsupportedMediaTypeError(APIError): ...
class ValidationError(APIError): ...
class RateLimitError(APIError): ...
class ServerError(APIError): ...
class ServiceUnavailableError(ServerError): ...


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    409: ConflictError, 410: GoneError, 413: PayloadTooLargeError, 415: UnsupportedMediaTypeError,
    422: ValidationError, 429: RateLimitError, 503: ServiceUnavailableError,
}


def error_for(status: int, problem: dict[str, Any], headers: dict[str, str] | None = None) -> APIError:
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    return cls(status, problem, headers)


class ChecksumMismatchError(RobustifyError):
    code = "checksum_mismatch"


class WaitTimeoutError(RobustifyError):
    """`last` is the job or model as last seen."""

    code = "wait_timeout"

    def __init__(self, message: str, last: Any = None) -> None:
        super().__init__(message)
        self.last = last
