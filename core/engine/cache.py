"""A content-addressed cache of measurements that several fine-tunes would otherwise repeat.

The children of a sweep fine-tune the same input model on the same test sample, so each would
measure the input model again in its final before/after evaluation and, with corruptions, make the
same corrupted test images again. With a `MeasurementCache` (`finetune(..., cache=...)`) the first
child stores what it measured and the later ones read it back:

    before               the input model's before-measurement (its metrics, the per-image outcomes
                         the paired changes are computed from, what the audit and the warnings need)
    corrupted images     the corrupted copies of the test sample (δ-independent)
    input corruptions    the input model's outcomes on them

A key is the sha256 of a canonical JSON of everything the numbers depend on (`key`): digests of the
weights and of the images measured, the threat, the attack settings, the seed, the device type and
precision, the library versions, and `VERSION`, which is bumped whenever the measuring code changes
what it measures. An entry is bytes in the safetensors format (tensors plus a JSON header, never a
pickle: `pack`, `unpack`); an entry that cannot be read is ignored, measured afresh and written
again. The engine knows only this protocol; the service keeps entries in its artifact store
(worker/measurecache.py), and `MemoryCache` keeps them in a dict (tests, notebooks).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from core.limits import MAX_CACHE_ENTRY_BYTES

VERSION = 1                           # bump when a cached measurement would no longer equal a fresh one
MAX_ENTRY_BYTES = MAX_CACHE_ENTRY_BYTES   # corrupted images above this are not cached (made afresh each time)


class MeasurementCache(Protocol):
    """Bytes by key. `get` returns None for a miss (and may for an entry it cannot read); `put`
    may drop an entry (too large, storage unavailable) but never raises for that reason."""

    max_entry_bytes: int

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...


class MemoryCache:
    """A MeasurementCache in a dict, counting its hits and misses."""

    def __init__(self, max_entry_bytes: int = MAX_ENTRY_BYTES) -> None:
        self.max_entry_bytes = max_entry_bytes
        self.entries: dict[str, bytes] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> bytes | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) <= self.max_entry_bytes:
            self.entries[key] = value


class ReadOnly:
    """A cache that reads another and writes nothing (the ranks of a DDP job other than 0)."""

    def __init__(self, cache: MeasurementCache) -> None:
        self.cache = cache
        self.max_entry_bytes = cache.max_entry_bytes

    def get(self, key: str) -> bytes | None:
        return self.cache.get(key)

    def put(self, key: str, value: bytes) -> None:
        return None


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over named tensors in sorted name order: each name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda item: item[0]):
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        digest.update(json.dumps([name, str(flat.dtype), list(t.shape)]).encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_digest(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str:
    """The input model: its weights `state` (the state dict that went in), the buffers a state dict
    leaves out (an input normalisation's mean and std may be such) and its structure (repr)."""
    extra = [(f"buffer:{k}", v) for k, v in model.named_buffers() if k not in state]
    return hashlib.sha256((tensor_digest([*state.items(), *extra]) + repr(model)).encode()).hexdigest()


def key(kind: str, **parts: Any) -> str:
    """The entry's key: sha256 of the canonical JSON of `kind`, VERSION, torch's version and `parts`."""
    canonical = json.dumps({"kind": kind, "version": VERSION, "torch": torch.__version__, **parts},
                           sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def pack(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """An entry: the tensors (CPU copies) and a JSON header, in the safetensors format."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()},   # no shared storage
                metadata={"entry": json.dumps(meta, allow_nan=True)})


def unpack(value: bytes | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The tensors and header of an entry; None for a miss or bytes that are no entry."""
    if value is None:
        return None
    try:
        from safetensors.torch import load

        tensors = load(value)
        size = int.from_bytes(value[:8], "little")       # the format: header length, JSON header, data
        meta = json.loads(json.loads(value[8:8 + size])["__metadata__"]["entry"])
    except Exception:   # damaged, truncated or foreign bytes: a miss
        return None
    return (tensors, meta) if isinstance(meta, dict) else None


def read(cache: MeasurementCache | None, entry_key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The entry under `entry_key`, or None: no cache, a miss, or a cache that failed to answer."""
    if cache is None:
        return None
    try:
        return unpack(cache.get(entry_key))
    except Exception:   # a cache that cannot be read costs a measurement, never the job
        return None


def write(cache: MeasurementCache | None, entry_key: str, value: bytes) -> bool:
    """Store an entry (not when over the cache's max_entry_bytes); whether it was handed over."""
    if cache is None or len(value) > cache.max_entry_bytes:
        return False
    try:
        cache.put(entry_key, value)
    except Exception:   # a cache that cannot be written costs the next job a measurement, never this one
        return False
    return True
