"""What /openapi.json adds to FastAPI's document: the bearer security scheme and the error
responses (RFC 9457 problems) every operation may return, so that generated clients and
schema-driven testers know them."""
from __future__ import annotations

from typing import Any

SECURITY_SCHEME = "bearerAuth"
PROBLEM_JSON = "application/problem+json"

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details; `code` is stable, `detail` says what to do next.",
    "required": ["type", "title", "status", "detail", "code", "instance"],
    "properties": {
        "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
        "detail": {"type": "string"}, "code": {"type": "string"}, "instance": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"},
                   "description": "validation errors: loc, field, msg, type"},
    },
    "additionalProperties": True,
}

_DESCRIPTIONS = {
    400: "Bad request: the body is not valid JSON, or a header is malformed",
    401: "Missing, malformed or revoked API key",
    403: "Refused: a key-less local server answers only local, same-site requests",
    404: "No such resource (or it belongs to another API key)",
    409: "Conflict with the resource's state",
    410: "The artifact's file is gone from the store",
    413: "The body is larger than the server's limit",
    415: "Unsupported Content-Type",
    422: "A value is invalid; `errors` names the fields",
    429: "This API key is at its own share (too_many_requests); retry after Retry-After seconds",
    503: "Busy or a dependency is down; retry after Retry-After seconds",
    507: "The artifact store is full",
}


def _statuses(path: str, method: str, operation: dict[str, Any]) -> set[int]:
    """The error statuses an operation can return."""
    if path == "/healthz":  # bypasses the concurrency limit, not the other request checks
        return {400, 403}
    statuses = {400, 403, 503}  # the request guards may answer these on every path
    if not path.startswith("/v1/"):
        return statuses
    statuses |= {401, 404, 422}
    if method in ("post", "delete"):
        statuses.add(409)
    if "requestBody" in operation or method == "post":
        statuses |= {413, 415}
    if path.endswith("/content") or path.endswith("/checkpoint") or "/report" in path:
        statuses |= {409, 410}
    if path in ("/v1/models", "/v1/datasets") and method == "post":
        statuses |= {429, 507}  # 429: the key's share of uploads (api/tenants.py)
    if path.endswith("/events"):
        statuses.add(429)  # the key's share of event streams
    return statuses


def add_security_and_problems(spec: dict[str, Any], *, keys_possible: bool) -> dict[str, Any]:
    components = spec.setdefault("components", {})
    components.setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
        "type": "http", "scheme": "bearer",
        "description": "An API key `rk_…` (created with `robustify keys create NAME`).",
    }
    problem_ref = {"schema": {"$ref": "#/components/schemas/Problem"}}
    for path, item in spec.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict):
                continue
            if path.startswith("/v1/") and keys_possible:
                operation["security"] = [{SECURITY_SCHEME: []}]
            responses = operation.setdefault("responses", {})
            for status in sorted(_statuses(path, method, operation)):
                entry = responses.get(str(status))
                if entry is None or "HTTPValidationError" in str(entry):  # FastAPI's own 422 shape
                    entry = responses[str(status)] = {"description": _DESCRIPTIONS[status]}
                entry["content"] = {PROBLEM_JSON: problem_ref}
    components["schemas"].pop("HTTPValidationError", None)
    components["schemas"].pop("ValidationError", None)
    _link_created_resources(spec)
    return spec


def _link_created_resources(spec: dict[str, Any]) -> None:
    """OpenAPI links from each POST that creates a resource to the operations on its id
    (POST /v1/jobs -> GET /v1/jobs/{job_id}, .../cancel, .../events, ...)."""
    paths = spec.get("paths", {})
    for collection, item in paths.items():
        create = item.get("post")
        if not collection.startswith("/v1/") or create is None:
            continue
        created = next((str(code) for code in create.get("responses", {}) if str(code) in ("201", "202")), None)
        if created is None:
            continue
        links = create["responses"][created].setdefault("links", {})
        for path, ops in paths.items():
            rest = path[len(collection):]
            if not rest.startswith("/{") or rest.count("{") != 1:
                continue  # only operations on this resource's own id
            param = rest[2:rest.index("}")]
            for operation in ops.values():
                if isinstance(operation, dict) and "operationId" in operation:
                    links[operation["operationId"]] = {"operationId": operation["operationId"],
                                                       "parameters": {param: "$response.body#/id"}}
