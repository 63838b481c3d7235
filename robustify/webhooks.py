"""Standard Webhooks signatures: verify what robustify sends (and the signing it uses).

The service signs every webhook with the endpoint's secret (`whsec_<base64>`):
`webhook-signature: v1,<base64 HMAC-SHA256 of "<webhook-id>.<webhook-timestamp>.<body>">`.
A receiver checks it on the raw body before parsing it::

    from robustify.webhooks import verify
    event = verify(secret, request.headers, request.body)   # raises WebhookVerificationError

Standard library only, so a receiver needs nothing else from this package.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from robustify.errors import RobustifyError

SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_SECONDS = 300.0  # replay window the spec recommends (5 minutes)


class WebhookVerificationError(RobustifyError):
    """The request is not an authentic, fresh robustify webhook."""


def _key(secret: str) -> bytes:
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookVerificationError("the secret is not a whsec_<base64> signing secret") from None


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for one attempt: `v1,<base64 HMAC-SHA256>`."""
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(mac).decode()}"


def verify(secret: str, headers: Mapping[str, str], body: bytes | str, *,
           tolerance: float = DEFAULT_TOLERANCE_SECONDS, now: float | None = None) -> dict[str, Any]:
    """Check the signature and the timestamp of a received webhook; return its parsed JSON.

    `headers` may use any capitalisation. Use the `webhook-id` header to drop repeats: a
    message that was retried arrives with the same id."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id, stamp, signatures = lower["webhook-id"], lower["webhook-timestamp"], lower["webhook-signature"]
    except KeyError as missing:
        raise WebhookVerificationError(f"missing header {missing.args[0]}") from None
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp {stamp!r} is not a Unix time") from None
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance window (replayed or clock skew)")
    raw = body.encode() if isinstance(body, str) else body
    expected = sign(secret, msg_id, timestamp, raw)
    if not any(hmac.compare_digest(expected, candidate) for candidate in signatures.split()):
        raise WebhookVerificationError("no signature matches this secret")
    payload: dict[str, Any] = json.loads(raw)
    return payload
