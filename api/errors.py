"""RFC 9457 problem details (`application/problem+json`) for every error the API returns."""
from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import Scope

from core.errors import ErrorCode, RobustifyError, StorageFull, is_storage_full

log = logging.getLogger("robustify.api")

PROBLEM_JSON = "application/problem+json"

# Codes for errors that Starlette raises itself (unknown routes, wrong methods, ...).
_STATUS_CODES: dict[int, str] = {
    400: ErrorCode.BAD_REQUEST, 401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN, 404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED, 406: ErrorCode.NOT_ACCEPTABLE, 409: ErrorCode.CONFLICT,
    413: ErrorCode.PAYLOAD_TOO_LARGE, 415: ErrorCode.UNSUPPORTED_MEDIA_TYPE, 422: ErrorCode.VALIDATION_ERROR,
    503: ErrorCode.SERVICE_UNAVAILABLE,
}
_HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
RETRY_AFTER_SECONDS = 2  # what a 503 asks the client to wait before trying again


class ApiError(Exception):
    """An error with an HTTP status and a stable code; `extra` adds members to the problem."""

    def __init__(
        self, status: int, code: str, detail: str, *,
        headers: dict[str, str] | None = None, **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = headers or {}
        self.extra = extra


def not_found(kind: str, ident: str) -> ApiError:
    shown = ident if len(ident) <= 64 else f"{ident[:40]}…({len(ident)} characters)"  # never echo a huge id
    return ApiError(404, ErrorCode.NOT_FOUND, f"{kind} {shown!r} does not exist (or belongs to another API key).")


def invalid_json(exc: json.JSONDecodeError | UnicodeDecodeError) -> ApiError:
    """400 for a body that does not parse, with where the parser stopped (same for every route)."""
    if isinstance(exc, UnicodeDecodeError):
        return ApiError(400, ErrorCode.BAD_REQUEST, f"the body is not valid JSON: it is not UTF-8 text ({exc.reason} "
                        f"at byte {exc.start}); send a UTF-8 JSON document.", position=exc.start)
    return ApiError(400, ErrorCode.BAD_REQUEST, f"the body is not valid JSON: {exc}; send a JSON document.",
                    position=exc.pos, line=exc.lineno, column=exc.colno)


def problem(
    status: int, code: str, detail: str, *, instance: str,
    headers: dict[str, str] | None = None, **extra: Any,
) -> JSONResponse:
    """A problem response; also used by the middleware, which has no Request object."""
    body: dict[str, Any] = {
        "type": f"urn:robustify:problem:{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        "instance": instance,
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers, media_type=PROBLEM_JSON)


def problem_response(
    request: Request, status: int, code: str, detail: str, *,
    headers: dict[str, str] | None = None, **extra: Any,
) -> JSONResponse:
    return problem(status, code, detail, instance=request.url.path, headers=headers, **extra)


def busy(instance: str, detail: str) -> JSONResponse:
    """503 for load the server sheds on purpose: the client should retry after a pause."""
    return problem(503, ErrorCode.SERVICE_BUSY, f"{detail}; retry after {RETRY_AFTER_SECONDS} s (Retry-After).",
                   instance=instance, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def allowed_methods(scope: Scope) -> list[str]:
    """Every method the path accepts, as the OpenAPI document declares them (plus the plain routes
    such as /docs); Starlette's own 405 names only the first matching route's. OPTIONS is always
    answered."""
    app, path = scope["app"], scope["path"]
    methods: set[str] = set()
    for template, item in app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)), path):
            methods |= {m.upper() for m in item if m in _HTTP_METHODS}
    for route in app.router.routes:
        if isinstance(route, Route) and route.path_regex.fullmatch(path) and route.methods:
            methods |= set(route.methods)
    return sorted(methods | {"OPTIONS"}) if methods else []


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        msg = err.get("msg")
        if isinstance(msg, str):  # pydantic prefixes a validator's own message; the message says it all
            msg = msg.removeprefix("Value error, ")
        out.append({"loc": loc, "field": ".".join(p for p in loc if p != "body"), "msg": msg,
                    "type": err.get("type")})
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return problem_response(request, exc.status, exc.code, exc.detail, headers=exc.headers, **exc.extra)

    @app.exception_handler(RobustifyError)
    async def _robustify_error(request: Request, exc: RobustifyError) -> JSONResponse:
        return problem_response(request, exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        raw = exc.errors()
        if raw and raw[0].get("type") == "json_invalid":
            # FastAPI reports a body that does not parse as a validation error; it is a bad request.
            doc, pos = getattr(exc, "body", None), raw[0]["loc"][-1]
            if isinstance(doc, str) and isinstance(pos, int):
                bad = invalid_json(json.JSONDecodeError(str(raw[0].get("ctx", {}).get("error", "")), doc, pos))
            else:
                bad = ApiError(400, ErrorCode.BAD_REQUEST, "the body is not valid JSON; send a JSON document.")
            return problem_response(request, bad.status, bad.code, bad.detail, **bad.extra)
        errors = _validation_errors(exc)
        fields = ", ".join(sorted({e["field"] or "body" for e in errors}))
        first = errors[0]["msg"] if errors else "invalid request"
        return problem_response(
            request, 422, ErrorCode.VALIDATION_ERROR, f"invalid value for {fields}: {first}", errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, ErrorCode.HTTP_ERROR)
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.url.path}; see /docs for the API."
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            # FastAPI's words for a JSON body that is not even text (e.g. not UTF-8).
            detail = "the body is not valid JSON: it could not be decoded as text; send a UTF-8 JSON document."
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            allow = ", ".join(allowed_methods(request.scope))
            detail = f"{request.method} is not allowed on {request.url.path}; it accepts {allow}."
            headers = {**(headers or {}), "Allow": allow}
        return problem_response(request, exc.status_code, code, detail, headers=headers)

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        text = str(getattr(exc, "orig", exc))
        if "no such table" in text or ("relation" in text and "does not exist" in text):
            return problem_response(request, 503, ErrorCode.DATABASE_NOT_MIGRATED,
                                    "the database schema is missing or old: run `robustify migrate` "
                                    "(alembic upgrade head) against ROBUSTIFY_DATABASE_URL, then retry.")
        if isinstance(exc, PoolTimeout):
            # Every pooled connection stayed busy for ROBUSTIFY_DB_POOL_TIMEOUT_SECONDS.
            return busy(request.url.path, "the server is busy: no database connection came free in time")
        if isinstance(exc, (OperationalError, InterfaceError)):
            return problem_response(request, 503, ErrorCode.DATABASE_UNAVAILABLE,
                                    "the database is unreachable right now; retry shortly (see /readyz).",
                                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        if isinstance(exc, DataError):
            # Inputs are validated before they reach the database; this is the net under that.
            log.warning("database refused a value on %s: %s", request.url.path, text[:500])
            return problem_response(request, 422, ErrorCode.VALIDATION_ERROR,
                                    "a value in the request cannot be stored (out of range or an invalid "
                                    "character); check the request's numbers and strings.")
        return await _unexpected(request, exc)

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        if is_storage_full(exc):
            full = StorageFull.from_os_error(exc)
            return problem_response(request, full.status, full.code, full.message)
        return await _unexpected(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return problem_response(
            request, 500, ErrorCode.INTERNAL_ERROR,
            "an unexpected error occurred; the server log has the details.",
        )
