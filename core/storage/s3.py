"""Artifacts in S3-compatible object storage (AWS S3, MinIO, Ceph RGW, Cloudflare R2, ...) via boto3.

Objects are named `<prefix>sha256/ab/<hex>`, the relpaths of the directory store, so content
addressing holds across backends: the same bytes are one object however many rows name them.
Files are hashed on local disk first, then uploaded from disk by boto3's transfer manager:
in parts of `s3_multipart_chunk_bytes`, several at once, so a large checkpoint is never held
in memory and a failed part is retried on its own. An object appears whole or not at all (a
PUT, or a multipart upload's completion, is atomic in S3). Reads that a worker needs as a file
go through a size-bounded local cache that checks every copy against its sha256.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from core.errors import ArtifactMissing, StorageUnavailable
from core.storage.blobcache import BlobCache
from core.storage.files import (
    make_temp_file,
    named_relpath,
    relpath_for,
    remove_stale_temp_files,
    sha256_file,
    sha256_of,
)

if TYPE_CHECKING:
    from core.service.settings import Settings

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def _not_found(exc: Exception) -> bool:
    return isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND


def make_s3_client(endpoint_url: str | None, region: str | None, addressing_style: str, *, pool: int = 10,
                   attempts: int = 5) -> Any:
    """A boto3 S3 client; credentials and anything unset come from boto3's standard chain."""
    config = Config(s3={"addressing_style": addressing_style}, max_pool_connections=pool,
                    signature_version="s3v4",  # presigned URLs too (botocore would sign some with SigV2)
                    retries={"mode": "standard", "max_attempts": attempts})
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


class S3ArtifactStore:
    """The `core.storage.artifacts.Store` interface on a bucket (and an optional key prefix)."""

    def __init__(self, bucket: str, *, client: Any, cache: BlobCache, scratch_dir: str | Path,
                 prefix: str = "", transfer: TransferConfig | None = None, presign_seconds: int = 0,
                 presign_client: Any = None) -> None:
        self.bucket, self.prefix, self.client = bucket, prefix, client
        self.cache = cache
        self.scratch_dir = Path(scratch_dir).resolve()
        self.transfer = transfer or TransferConfig()
        self.presign_seconds = presign_seconds
        self.presign_client = presign_client or client

    @classmethod
    def from_settings(cls, settings: Settings) -> S3ArtifactStore:
        assert settings.s3_bucket
        pool = max(10, 2 * settings.s3_max_concurrency)
        client = make_s3_client(settings.s3_endpoint_url, settings.s3_region, settings.s3_addressing_style,
                                pool=pool, attempts=settings.s3_max_attempts)
        presign_client = None
        if settings.s3_presign_endpoint_url:  # signing is local: this client never connects
            presign_client = make_s3_client(settings.s3_presign_endpoint_url, settings.s3_region,
                                            settings.s3_addressing_style)
        chunk = settings.s3_multipart_chunk_bytes
        cache_root = settings.resolved_cache_dir
        return cls(settings.s3_bucket, client=client, prefix=settings.s3_prefix,
                   cache=BlobCache(cache_root / "blobs", settings.cache_max_bytes), scratch_dir=cache_root / "tmp",
                   transfer=TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk,
                                           max_concurrency=settings.s3_max_concurrency),
                   presign_seconds=settings.s3_presign_seconds, presign_client=presign_client)

    relpath_for = staticmethod(relpath_for)

    # ------------------------------------------------------------------ names and errors
    def key(self, relpath: str) -> str:
        sha256_of(relpath)  # refuses anything that is not a content-addressed path
        return self.prefix + relpath

    def _where(self) -> str:
        return f"bucket {self.bucket!r}" + (f" (prefix {self.prefix!r})" if self.prefix else "")

    def _unavailable(self, action: str, exc: Exception) -> StorageUnavailable:
        return StorageUnavailable(
            f"object storage refused or did not answer ({action} in {self._where()}): {exc}. Check that the "
            "endpoint is reachable, the bucket exists and the credentials may read and write it; "
            "the request can be retried once storage is back.")

    def _missing(self, relpath: str) -> ArtifactMissing:
        return ArtifactMissing(
            f"the stored file {relpath} is recorded but missing from {self._where()}; it may have been deleted, or "
            "this process uses another bucket or prefix than the others (ROBUSTIFY_S3_BUCKET, ROBUSTIFY_S3_PREFIX). "
            "Upload the file again.")

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            if _not_found(exc):
                return None
            raise self._unavailable("HEAD " + key, exc) from exc

    # ------------------------------------------------------------------ writing
    def temp_file(self, suffix: str = "") -> Path:
        return make_temp_file(self.scratch_dir, suffix)

    def remove_stale_temp_files(self, max_age_seconds: float = 24 * 3600) -> int:
        return remove_stale_temp_files(self.scratch_dir, max_age_seconds)

    def put_file(self, src_path: str | Path, *, move: bool = False) -> tuple[str, int, str]:
        src = Path(src_path)
        sha, size = sha256_file(src)
        rel = relpath_for(sha)
        key = self.key(rel)
        head = self._head(key)
        if head is None or int(head.get("ContentLength", -1)) != size:
            try:
                self.client.upload_file(str(src), self.bucket, key, Config=self.transfer,
                                        ExtraArgs={"Metadata": {"sha256": sha},
                                                   "ContentType": "application/octet-stream"})
            except (ClientError, BotoCoreError) as exc:
                raise self._unavailable("upload " + key, exc) from exc
        if move:
            src.unlink(missing_ok=True)
        return sha, size, rel

    def put_bytes(self, data: bytes) -> tuple[str, int, str]:
        sha = hashlib.sha256(data).hexdigest()
        rel = relpath_for(sha)
        key = self.key(rel)
        if self._head(key) is None:
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, Metadata={"sha256": sha},
                                       ContentType="application/octet-stream")
            except (ClientError, BotoCoreError) as exc:
                raise self._unavailable("PUT " + key, exc) from exc
        return sha, len(data), rel

    def put_named(self, name: str, data: bytes) -> None:
        key = self.prefix + named_relpath(name)
        try:   # one PUT: the object is replaced whole or not at all
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="application/octet-stream")
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable("PUT " + key, exc) from exc

    def get_named(self, name: str) -> bytes | None:
        key = self.prefix + named_relpath(name)
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            if _not_found(exc):
                return None
            raise self._unavailable("GET " + key, exc) from exc
        return body

    def delete(self, relpath: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(relpath))
        except (ClientError, BotoCoreError) as exc:
            if not _not_found(exc):
                raise self._unavailable("DELETE " + relpath, exc) from exc
        self.cache.discard(sha256_of(relpath))

    # ------------------------------------------------------------------ reading
    def exists(self, relpath: str) -> bool:
        return self._head(self.key(relpath)) is not None

    def open(self, relpath: str) -> BinaryIO:
        """The object's body as a stream (read in chunks; nothing is buffered whole)."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(relpath))["Body"]
        except (ClientError, BotoCoreError) as exc:
            if _not_found(exc):
                raise self._missing(relpath) from None
            raise self._unavailable("GET " + relpath, exc) from exc

    def local_path(self, relpath: str) -> Path:
        key = self.key(relpath)

        def fetch(dest: Path) -> None:
            try:  # ranged GETs in parallel for large objects
                self.client.download_file(self.bucket, key, str(dest), Config=self.transfer)
            except (ClientError, BotoCoreError) as exc:
                if _not_found(exc):
                    raise self._missing(relpath) from None
                raise self._unavailable("download " + key, exc) from exc

        return self.cache.get(sha256_of(relpath), fetch)

    def on_disk(self, relpath: str) -> Path | None:
        return None

    def presigned_url(self, relpath: str, *, filename: str, content_type: str) -> str | None:
        if self.presign_seconds <= 0:
            return None
        disposition = f"attachment; filename*=utf-8''{quote(filename)}"
        return self.presign_client.generate_presigned_url(
            "get_object", ExpiresIn=self.presign_seconds,
            Params={"Bucket": self.bucket, "Key": self.key(relpath), "ResponseContentType": content_type,
                    "ResponseContentDisposition": disposition})

    def keys(self) -> list[str]:
        """Every stored relpath under the prefix (tests and housekeeping)."""
        out: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            out += [obj["Key"][len(self.prefix):] for obj in page.get("Contents", [])]
        return sorted(out)

    def check(self) -> dict[str, Any]:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return {"ok": True, "backend": "s3", "bucket": self.bucket}
        except (ClientError, BotoCoreError) as exc:
            return {"ok": False, "backend": "s3", "bucket": self.bucket, "error": f"{type(exc).__name__}: {exc}"[:500]}
