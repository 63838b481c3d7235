"""API keys: `rk_<random>` shown once at creation, stored only as a sha256 hash."""
from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.service.db import ApiKey, new_id, utcnow

KEY_PREFIX = "rk_"


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def create_api_key(session: Session, name: str) -> tuple[ApiKey, str]:
    """Create a key; returns (row, plaintext). The plaintext is never stored (the caller commits)."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key"), name=name, prefix=plaintext[:10], key_hash=hash_key(plaintext),
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row, plaintext


def authenticate(session: Session, plaintext: str | None) -> ApiKey | None:
    """The live key matching `plaintext`, or None (unknown, revoked or malformed)."""
    if not plaintext or not plaintext.startswith(KEY_PREFIX) or len(plaintext) > 200:
        return None
    digest = hash_key(plaintext)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    # The lookup is by hash (an index); compare_digest keeps the final check constant-time.
    if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
        return None
    return row


def revoke_api_key(session: Session, key_id: str) -> bool:
    """Revoke a key by id or by its shown prefix; False if no live key matched (the caller commits)."""
    row = session.get(ApiKey, key_id)
    if row is None:
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == key_id))
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    return True


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))
