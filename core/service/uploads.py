"""Checks an uploaded file before it is stored, without torch (the API process never imports it).

`inspect_safetensors` reads the safetensors header by hand: 8 bytes little-endian header
length, a JSON header naming each tensor's dtype, shape and byte range, then the raw data.
Pickle files (torch.save, plain pickle) are refused: loading one runs arbitrary code.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from core.errors import InvalidModelFile

# Bytes per element of the dtypes safetensors writes.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself applies

PICKLE_REFUSED = (
    "this looks like a pickle file (torch.save or pickle). Pickle is refused because loading it "
    "runs arbitrary code. Save the state dict as safetensors instead: "
    "`from safetensors.torch import save_file; save_file(model.state_dict(), 'model.safetensors')`"
)


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save writes a zip archive; a bare pickle (protocol 2..5) starts with 0x80 <protocol>.
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5)


def inspect_safetensors(path: str | Path) -> dict[str, dict[str, Any]]:
    """{tensor name: {"dtype", "shape"}} of a well-formed safetensors file; else InvalidModelFile."""
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and _looks_like_pickle(head)):
            # A real safetensors header of length 0x80?? would also start with 0x80: only refuse
            # as pickle when the rest does not parse as safetensors.
            try:
                return _parse(fh, head, file_size)
            except InvalidModelFile:
                raise InvalidModelFile(PICKLE_REFUSED) from None
        return _parse(fh, head, file_size)


def _fail(detail: str) -> InvalidModelFile:
    return InvalidModelFile(
        f"not a valid safetensors file: {detail}. Upload a state dict written by "
        "safetensors.torch.save_file (and make sure the upload was not cut short)."
    )


def _parse(fh: Any, head: bytes, file_size: int) -> dict[str, dict[str, Any]]:
    if len(head) < 8:
        raise _fail(f"the file has {file_size} bytes, fewer than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", head)
    if header_len == 0 or header_len > MAX_HEADER_BYTES:
        raise _fail(f"header length {header_len} is not plausible")
    if 8 + header_len > file_size:
        raise _fail(f"the header claims {header_len} bytes but the file is truncated ({file_size} bytes)")
    fh.seek(8)
    raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail("the header is not a JSON object")

    data_size = file_size - 8 - header_len
    tensors: dict[str, dict[str, Any]] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise _fail("__metadata__ must be an object of strings")
            continue
        tensors[name] = _check_entry(name, info, data_size)
        begin, end = info["data_offsets"]
        ranges.append((begin, end, name))

    # Tensors must tile the data section exactly: no gaps, no overlaps, nothing left over.
    ranges.sort()
    cursor = 0
    for begin, end, name in ranges:
        if begin != cursor:
            raise _fail(f"tensor {name!r} starts at byte {begin}, expected {cursor} (gap or overlap)")
        cursor = end
    if cursor != data_size:
        if cursor > data_size:
            raise _fail(f"the file is truncated: tensors need {cursor} data bytes, it has {data_size}")
        raise _fail(f"{data_size - cursor} unexpected bytes after the last tensor")
    return tensors


def _check_entry(name: str, info: Any, data_size: int) -> dict[str, Any]:
    if not isinstance(info, dict):
        raise _fail(f"entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise _fail(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _fail(f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _fail(f"tensor {name!r} has data_offsets {offsets} out of order")
    if end > data_size:
        raise _fail(f"the file is truncated: tensor {name!r} ends at byte {end} of a {data_size}-byte data section")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise _fail(f"tensor {name!r} holds {end - begin} bytes but {dtype}{shape} needs {expected}")
    return {"dtype": dtype, "shape": list(shape)}
