"""The measurement cache of fine-tunes (core.engine.cache) in the job store that keeps the artifacts.

Entries are named by their key, `cache/measurements/<key>` in the store (under the artifact
directory, or under ROBUSTIFY_S3_PREFIX in the bucket), written atomically by the store (a rename
on disk, one PUT in S3), so a reader sees a whole entry or none. Two workers that miss together
both measure and both write the same numbers; the last write stays. No database row names an
entry: deleting the folder (or the prefix) only costs later jobs a measurement
(docs/operations.md). A store that fails to answer costs a measurement, never the job. Torch is
not imported here: the worker's parent process imports this module.
"""
from __future__ import annotations

import logging

from core.limits import MAX_CACHE_ENTRY_BYTES
from core.storage.artifacts import Store

log = logging.getLogger("robustify.worker")

PREFIX = "cache/measurements/"
MAX_ENTRY_BYTES = MAX_CACHE_ENTRY_BYTES   # corrupted test images above this are made afresh by every job


class StoreCache:
    """core.engine.cache.MeasurementCache on an artifact store (a directory or an S3 bucket)."""

    def __init__(self, store: Store, max_entry_bytes: int = MAX_ENTRY_BYTES) -> None:
        self.store = store
        self.max_entry_bytes = max_entry_bytes

    def get(self, key: str) -> bytes | None:
        try:
            return self.store.get_named(PREFIX + key)
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be read is a miss
            log.warning("measurement cache: could not read %s (%s: %s); measuring afresh", key, type(exc).__name__, exc)
            return None

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_entry_bytes:
            return
        try:
            self.store.put_named(PREFIX + key, value)
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written costs a later job a measurement
            log.warning("measurement cache: could not write %s (%s: %s)", key, type(exc).__name__, exc)
