"""Reading request bodies under the upload cap, without buffering uploads in memory.

The cap is checked against Content-Length before anything is read, and bytes are counted
while streaming (a chunked upload has no Content-Length), so an oversize body is a 413 with
nothing left on disk. The file part of a multipart form goes straight to the artifact store's
local temp folder; the caller validates it and then moves it into the store or deletes it.
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
from core.artifacts import Store

MAX_FIELD_BYTES = 64 * 1024  # a text field (name, metadata JSON, ...)


def too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large",
                    f"the request body is larger than the limit of {limit} bytes "
                    "(ROBUSTIFY_MAX_UPLOAD_BYTES on the server).", limit=limit)


def check_content_length(request: Request, limit: int) -> None:
    raw = request.headers.get("content-length")
    if raw is None:
        return
    try:
        length = int(raw)
    except ValueError:
        raise ApiError(400, "bad_request", "Content-Length is not a number.") from None
    if length > limit:
        raise too_large(limit)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json(request: Request, limit: int) -> Any:
    check_content_length(request, limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid_json(exc) from None


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
        raise ApiError(400, "bad_request", "multipart body without a boundary in Content-Type.")

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
                errors.append(ApiError(400, "bad_request", f"more than one `{file_field}` part."))
                return
            upload.file_path = store.temp_file()
            upload.filename = disp.get(b"filename", b"").decode("utf-8", "replace") or None
            state["fh"] = open(upload.file_path, "wb")
        else:
            state["buf"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["fh"] is not None:
            state["fh"].write(data[start:end])
            upload.file_size += end - start
        elif state["buf"] is not None:
            state["buf"] += data[start:end]
            if len(state["buf"]) > MAX_FIELD_BYTES:
                errors.append(ApiError(413, "payload_too_large",
                                       f"form field {state['name']!r} is over {MAX_FIELD_BYTES} bytes."))
                state["buf"] = None

    def on_part_end() -> None:
        if state["fh"] is not None:
            state["fh"].close()
            state["fh"] = None
        elif state["buf"] is not None and state["name"]:
            upload.fields[state["name"]] = bytes(state["buf"]).decode("utf-8", "replace")

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
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from None
    except BaseException:
        upload.discard()
        raise
    finally:
        if state["fh"] is not None:
            state["fh"].close()
    return upload
