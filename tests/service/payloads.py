"""Small real payloads for the service tests, built with numpy only (no torch in these tests)."""
from __future__ import annotations

import io
import pickle
import uuid

import numpy as np
from safetensors.numpy import save as save_safetensors


def safetensors_bytes(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return save_safetensors({
        "conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "fc.weight": rng.standard_normal((10, 16)).astype(np.float32),
        "fc.bias": np.zeros(10, dtype=np.float32),
    })


def pickle_bytes() -> bytes:
    return pickle.dumps({"fc.weight": [[0.0] * 4]}, protocol=4)


def torch_zip_bytes() -> bytes:
    # What torch.save writes: a zip archive holding a pickle (built here without torch).
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bytes())
    return buf.getvalue()


def npz_bytes(n: int = 20, n_labels: int | None = None, shape: tuple[int, ...] = (8, 8)) -> bytes:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    y = (np.arange(n if n_labels is None else n_labels) % 10).astype(np.int64)  # every class present
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    return buf.getvalue()


def multipart_body(fields: dict[str, str], file_bytes: bytes, filename: str = "model.safetensors") -> tuple[bytes, str]:
    """A multipart/form-data body built by hand (for chunked uploads without Content-Length)."""
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode() + file_bytes + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"
