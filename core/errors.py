"""Errors with a stable `code`, shared by the engine, the workers and the API.

The API turns them into RFC 9457 problem responses; the worker stores `code` and `message`
in the job's or model's `error` field. Messages say what went wrong and what to do next.
"""
from __future__ import annotations

import errno
import re


class RobustifyError(Exception):
    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ValidationError(RobustifyError):
    code = "validation_error"
    status = 422


class InvalidModelFile(RobustifyError):
    code = "invalid_model_file"
    status = 422


class UnsupportedArchitecture(RobustifyError):
    code = "unsupported_architecture"
    status = 422


class ModelDownloadFailed(RobustifyError):
    code = "model_download_failed"
    status = 502


class DatasetUnavailable(RobustifyError):
    code = "dataset_unavailable"
    status = 422


class InvalidDataset(RobustifyError):
    code = "validation_error"
    status = 422


class ArtifactMissing(RobustifyError):
    """A row names a stored file that the artifact store no longer has."""
    code = "artifact_missing"
    status = 410


class ArtifactCorrupt(RobustifyError):
    """A stored file's bytes do not hash to the sha256 its row records."""
    code = "artifact_corrupt"
    status = 502


class StorageUnavailable(RobustifyError):
    """The artifact store (a bucket, a directory) cannot be reached or refused the request."""
    code = "storage_unavailable"
    status = 503


class StorageFull(RobustifyError):
    code = "storage_full"
    status = 507

    @classmethod
    def from_os_error(cls, exc: BaseException) -> "StorageFull":
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return cls(f"the artifact store is full ({why}). Free space in the store "
                   "(ROBUSTIFY_ARTIFACT_DIR) or delete old models, data sets and jobs, then retry.")


# Libraries with a Rust core (safetensors' SafetensorError) report an I/O error as text that
# ends in "(os error N)" instead of raising an OSError with errno N.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def is_storage_full(exc: BaseException) -> bool:
    """A write failed because the disk (or the user's quota) has no room left: an OSError with
    ENOSPC/EDQUOT, or an error whose message carries that os error, here or in its causes."""
    full = (errno.ENOSPC, errno.EDQUOT)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in full:
            return True
        if any(int(code) in full for code in _RUST_OS_ERROR.findall(str(current))):
            return True
        current = current.__cause__ or current.__context__
    return False


class DatasetTooLarge(InvalidDataset):
    code = "payload_too_large"
    status = 413
