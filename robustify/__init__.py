"""The Python SDK of robustify, importable without torch: `from robustify import Client`.

Named after the project (`pip install robustify` gives `import robustify`), as openai,
replicate and mlflow name theirs; the service's own packages (api, worker, core) are separate.
"""
from __future__ import annotations

from robustify._version import __version__
from robustify.client import DEFAULT_URL, Client
from robustify.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ChecksumMismatchError,
    ConflictError,
    GoneError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    RobustifyError,
    ServerError,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
    ValidationError,
    WaitTimeoutError,
)
from robustify.pagination import Page
from robustify.radius import parse_radius
from robustify.resources.jobs import Downloads
from robustify.results import Accuracy, AttackRun, AuditCheck, Change, ClassNumbers, Measurements, Outcome
from robustify.types import (
    Checkpoint,
    Dataset,
    DatasetWarning,
    Deleted,
    ErrorInfo,
    Event,
    Job,
    Model,
    Progress,
    SanityCheck,
    SanityVariant,
    WebhookDelivery,
    WebhookEndpoint,
)

__all__ = [
    "DEFAULT_URL",
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "Accuracy",
    "AttackRun",
    "AuditCheck",
    "AuthenticationError",
    "BadRequestError",
    "Change",
    "Checkpoint",
    "ChecksumMismatchError",
    "ClassNumbers",
    "Client",
    "ConflictError",
    "Dataset",
    "DatasetWarning",
    "Deleted",
    "Downloads",
    "ErrorInfo",
    "Event",
    "GoneError",
    "Job",
    "Measurements",
    "Model",
    "NotFoundError",
    "Outcome",
    "Page",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Progress",
    "RateLimitError",
    "RobustifyError",
    "SanityCheck",
    "SanityVariant",
    "ServerError",
    "ServiceUnavailableError",
    "UnsupportedMediaTypeError",
    "ValidationError",
    "WaitTimeoutError",
    "WebhookDelivery",
    "WebhookEndpoint",
    "__version__",
    "parse_radius",
]
