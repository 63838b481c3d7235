"""Errors with a stable `code`, shared by the engine, the workers and the API.

The API turns them into RFC 9457 problem responses; the worker stores `code` and `message`
in the job's or model's `error` field. Messages say what went wrong and what to do next.
"""
from __future__ import annotations

import errno


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
    def from_os_error(cls, exc: OSError) -> "StorageFull":
        return cls(f"the artifact store is full ({exc.strerror or exc}). Free space in the store "
                   "(ROBUSTIFY_ARTIFACT_DIR) or delete old models, data sets and jobs, then retry.")


def is_storage_full(exc: BaseException) -> bool:
    """A write failed because the disk (or the user's quota) has no room left."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class DatasetTooLarge(InvalidDataset):
    code = "payload_too_large"
    status = 413
