"""Errors with a stable `code`, shared by the engine, the workers and the API.

The API turns them into RFC 9457 problem responses; the worker stores `code` and `message`
in the job's or model's `error` field. Messages say what went wrong and what to do next.
Every code the service answers with is a member of ErrorCode, spelled here once (a test keeps
string codes out of the server's code).
"""
from __future__ import annotations

import errno
import re
from enum import StrEnum


class ErrorCode(StrEnum):
    """The stable codes of problem responses and of a job's or model's `error` (docs/http-api.md)."""

    # the request itself
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    HOST_NOT_ALLOWED = "host_not_allowed"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    NOT_ACCEPTABLE = "not_acceptable"
    CONFLICT = "conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    VALIDATION_ERROR = "validation_error"
    # models, data sets, jobs
    INVALID_MODEL_FILE = "invalid_model_file"
    UNSUPPORTED_ARCHITECTURE = "unsupported_architecture"
    MODEL_DOWNLOAD_FAILED = "model_download_failed"
    MODEL_NOT_READY = "model_not_ready"
    DATASET_UNAVAILABLE = "dataset_unavailable"
    INCOMPATIBLE_DATASET = "incompatible_dataset"
    WEBHOOK_TARGET_FORBIDDEN = "webhook_target_forbidden"
    WEBHOOK_TARGET_UNRESOLVABLE = "webhook_target_unresolvable"
    CATALOG_BUILDING = "catalog_building"
    CATALOG_UNAVAILABLE = "catalog_unavailable"
    # running a job
    CUDA_OUT_OF_MEMORY = "cuda_out_of_memory"
    NOT_ENOUGH_DEVICES = "not_enough_devices"
    WORKER_LOST = "worker_lost"
    # the service's parts
    ARTIFACT_MISSING = "artifact_missing"
    ARTIFACT_CORRUPT = "artifact_corrupt"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    STORAGE_FULL = "storage_full"
    BROKER_UNAVAILABLE = "broker_unavailable"
    DATABASE_UNAVAILABLE = "database_unavailable"
    DATABASE_NOT_MIGRATED = "database_not_migrated"
    SERVICE_BUSY = "service_busy"
    TOO_MANY_REQUESTS = "too_many_requests"   # one API key beyond its own share (429)
    TOO_MANY_QUEUED_JOBS = "too_many_queued_jobs"   # one API key's queued jobs at its share (429)
    SERVICE_UNAVAILABLE = "service_unavailable"
    NOT_READY = "not_ready"
    INTERNAL_ERROR = "internal_error"
    HTTP_ERROR = "error"  # an HTTP status without a code of its own


class RobustifyError(Exception):
    code: str = ErrorCode.INTERNAL_ERROR
    status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ValidationError(RobustifyError):
    code = ErrorCode.VALIDATION_ERROR
    status = 422


class InvalidModelFile(RobustifyError):
    code = ErrorCode.INVALID_MODEL_FILE
    status = 422


class UnsupportedArchitecture(RobustifyError):
    code = ErrorCode.UNSUPPORTED_ARCHITECTURE
    status = 422


class ModelDownloadFailed(RobustifyError):
    code = ErrorCode.MODEL_DOWNLOAD_FAILED
    status = 502


class DatasetUnavailable(RobustifyError):
    code = ErrorCode.DATASET_UNAVAILABLE
    status = 422


class InvalidDataset(RobustifyError):
    code = ErrorCode.VALIDATION_ERROR
    status = 422


class ArtifactMissing(RobustifyError):
    """A row names a stored file that the artifact store no longer has."""
    code = ErrorCode.ARTIFACT_MISSING
    status = 410


class ArtifactCorrupt(RobustifyError):
    """A stored file's bytes do not hash to the sha256 its row records."""
    code = ErrorCode.ARTIFACT_CORRUPT
    status = 502


class StorageUnavailable(RobustifyError):
    """The artifact store (a bucket, a directory) cannot be reached or refused the request."""
    code = ErrorCode.STORAGE_UNAVAILABLE
    status = 503


class StorageFull(RobustifyError):
    code = ErrorCode.STORAGE_FULL
    status = 507

    @classmethod
    def from_os_error(cls, exc: BaseException) -> StorageFull:
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
    code = ErrorCode.PAYLOAD_TOO_LARGE
    status = 413
