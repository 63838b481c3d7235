"""Reading request bodies under the size caps, without buffering uploads in memory.

The cap is checked against Content-Length before anything is read, and bytes are counted
while streaming (a chunked upload has no Content-Length), so an oversize body is a 413 with
nothing left on disk. The file part of a multipart form goes straight to the artifact store's
local temp folder; the caller validates it and then moves it into the store or deletes it.

JSON documents are parsed by `parse_json` only, which refuses what Python's parser would let
through but no database or client can use: NaN and Infinity, numbers out of float range, NUL
characters and lone surrogates in strings, and nesting deeper than ROBUSTIFY_MAX_JSON_DEPTH.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ApiError, invalid_json
from core.errors import ErrorCode
from core.service.settings import Settings
from core.storage.artifacts import Store

MAX_FIELD_BYTES = 64 * 1024  # a text field (name, metadata JSON, ...)


def too_large(limit: int, variable: str = "ROBUSTIFY_MAX_UPLOAD_BYTES") -> ApiError:
    return ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE,
                    f"the request body is larger than the limit of {limit} bytes "
                    f"({variable} on the server).", limit=limit)


def content_length(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not raw.strip().isdigit() or not raw.strip().isascii():
        raise ApiError(400, ErrorCode.BAD_REQUEST, "Content-Length is not a number.")
    return int(raw)


def check_content_length(request: Request, limit: int) -> None:
    length = content_length(request.headers.get("content-length"))
    if length is not None and length > limit:
        raise too_large(limit)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _not_json(what: str) -> ApiError:
    return ApiError(400, ErrorCode.BAD_REQUEST, f"the body is not valid JSON: {what}; send a JSON document.")


def _no_constant(name: str) -> Any:
    raise _not_json(f"{name} is not a JSON number (JSON numbers are finite)")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ApiError(422, ErrorCode.VALIDATION_ERROR, f"the number {text[:40]} is out of range (beyond ±1.8e308).")
    return value


def parse_json(raw: bytes, *, max_depth: int) -> Any:
    """The JSON document in `raw`, or an ApiError saying what is wrong with it."""
    try:
        doc = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise _not_json(f"it is nested deeper than {max_depth} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid_json(exc) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise _not_json(str(exc)) from None
    _check_tree(doc, max_depth)
    return doc


def _check_tree(doc: Any, max_depth: int) -> None:
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            check_text(node)
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > max_depth:
            raise _not_json(f"it is nested deeper than {max_depth} levels (ROBUSTIFY_MAX_JSON_DEPTH)")
        if isinstance(node, dict):
            for key, value in node.items():
                check_text(key)
                stack.append((value, depth + 1))
        else:
            stack.extend((item, depth + 1) for item in node)


def check_text(text: str) -> None:
    """Strings that reach the database: no NUL (PostgreSQL refuses it), no lone surrogate."""
    if "\x00" in text:
        raise ApiError(422, ErrorCode.VALIDATION_ERROR, "strings must not contain NUL characters (\\u0000); "
                       "remove them from the request.")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(422, ErrorCode.VALIDATION_ERROR, "a string holds a lone surrogate (\\ud800-\\udfff), "
                           "which is not Unicode text; send valid UTF-16 pairs or UTF-8.") from None


def check_metadata(metadata: dict[str, Any] | None, settings: Settings, field_name: str = "metadata") -> None:
    """`metadata` is stored with the resource and returned in every list page: keep it small and
    storable (a multipart form's metadata text did not pass through parse_json)."""
    if metadata is None:
        return
    _check_tree(metadata, settings.max_json_depth)
    try:
        size = len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode())
    except ValueError:
        raise ApiError(422, ErrorCode.VALIDATION_ERROR, "metadata holds NaN or Infinity, which JSON cannot store; "
                       "use null or a string instead.") from None
    if size > settings.max_metadata_bytes:
        raise ApiError(422, ErrorCode.VALIDATION_ERROR,
                       f"metadata is {size} bytes of JSON; the limit is {settings.max_metadata_bytes} "
                       "(ROBUSTIFY_MAX_METADATA_BYTES). Store large data elsewhere and reference it.",
                       errors=[{"loc": ["body", field_name], "field": field_name, "msg": "metadata too large",
                                "type": "too_long"}])


def parse_metadata_field(text: str | None, settings: Settings) -> dict[str, Any] | None:
    """The `metadata` text field of a multipart form: a JSON object, or a 422 naming the field."""
    if not text or not text.strip():
        return None
    try:
        meta = parse_json(text.encode(), max_depth=settings.max_json_depth)
    except ApiError as exc:
        raise ApiError(422, ErrorCode.VALIDATION_ERROR, f"metadata must be a JSON object ({exc.detail})",
                       errors=[{"loc": ["body", "metadata"], "field": "metadata", "msg": exc.detail,
                                "type": "json_invalid"}]) from None
    if not isinstance(meta, dict):
        raise ApiError(422, ErrorCode.VALIDATION_ERROR, "metadata must be a JSON object.",
                       errors=[{"loc": ["body", "metadata"], "field": "metadata", "msg": "not a JSON object",
                                "type": "value_error"}])
    check_metadata(meta, settings)
    return meta


async def read_json(request: Request, settings: Settings) -> Any:
    """The request's JSON document (the guard middleware has already capped its size)."""
    check_content_length(request, settings.max_json_bytes)
    raw = await request.body()
    if len(raw) > settings.max_json_bytes:
        raise too_large(settings.max_json_bytes, "ROBUSTIFY_MAX_JSON_BYTES")
    return parse_json(raw or b"null", max_depth=settings.max_json_depth)


@dataclass
class MultipartUpload:
    fields: dict[str, str] = field(default_factory=dict)
    file_path: Path | None = None    # the artifact store's temp file
    filename: str | None = None
    file_size: int = 0

    def discard(self) -> None:
        if self.file_path is not None:
            self.file_path.unlink(missing_ok=True)
            self.file_path = None


async def read_multipart(
    request: Request, store: Store, limit: int, *, file_field: str = "file",
) -> MultipartUpload:
    """Parse a multipart/form-data body; the `file_field` part is written to a temp file."""
    check_content_length(request, limit)
    _, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, ErrorCode.BAD_REQUEST, "multipart body without a boundary in Content-Type.")

    upload = MultipartUpload()
    state: dict[str, Any] = {"headers": {}, "hname": b"", "hvalue": b"", "name": None, "buf": None, "fh": None}
    errors: list[ApiError] = []

    def on_part_begin() -> None:
        state.update(headers={}, hname=b"", hvalue=b"", name=None, buf=None, fh=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["hname"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["hvalue"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["hname"].decode("latin-1").lower()] = state["hvalue"]
        state["hname"], state["hvalue"] = b"", b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(state["headers"].get("content-disposition"))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        if name == file_field:
            if upload.file_path is not None:
                errors.append(ApiError(400, ErrorCode.BAD_REQUEST, f"more than one `{file_field}` part."))
                return
            upload.file_path = store.temp_file()
            # The file name is stored and echoed: keep printable characters only.
            filename = disp.get(b"filename", b"").decode("utf-8", "replace")
            upload.filename = "".join(ch for ch in filename if ch.isprintable()) or None
            # open across the part's data callbacks; on_part_end and the final cleanup close it
            state["fh"] = open(upload.file_path, "wb")  # noqa: SIM115
        else:
            state["buf"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["fh"] is not None:
            state["fh"].write(data[start:end])
            upload.file_size += end - start
        elif state["buf"] is not None:
            state["buf"] += data[start:end]
            if len(state["buf"]) > MAX_FIELD_BYTES:
                errors.append(ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE,
                                       f"form field {state['name']!r} is over {MAX_FIELD_BYTES} bytes."))
                state["buf"] = None

    def on_part_end() -> None:
        if state["fh"] is not None:
            state["fh"].close()
            state["fh"] = None
        elif state["buf"] is not None and state["name"]:
            value = bytes(state["buf"]).decode("utf-8", "replace")
            try:
                check_text(value)
            except ApiError as exc:
                errors.append(exc)
            upload.fields[state["name"]] = value

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
    })
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise too_large(limit)
            parser.write(chunk)
            if errors:
                raise errors[0]
        parser.finalize()
        if errors:
            raise errors[0]
    except MultipartParseError as exc:
        upload.discard()
        raise ApiError(400, ErrorCode.BAD_REQUEST, f"malformed multipart body: {exc}") from None
    except BaseException:
        upload.discard()
        raise
    finally:
        if state["fh"] is not None:
            state["fh"].close()
    return upload
