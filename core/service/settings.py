"""Service settings, from environment variables prefixed ROBUSTIFY_ (pydantic-settings).

With nothing set, everything lives under one data directory (the embedded default): a SQLite
database, a server-less broker and the artifact store. ROBUSTIFY_DATABASE_URL (PostgreSQL) and
ROBUSTIFY_BROKER_URL (Redis) switch the same code to the distributed deployment, and
ROBUSTIFY_S3_BUCKET moves the artifacts to S3-compatible object storage, so that workers on
other machines share nothing with the API but the database, the broker and the bucket.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.service.netpolicy import parse_networks


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROBUSTIFY_", extra="ignore")

    data_dir: Path = Path("robustify-data")
    database_url: str | None = None
    broker_url: str | None = None
    artifact_dir: Path | None = None
    model_dir: Path | None = None      # RobustBench weights: <model_dir>/<dataset>/<threat>/<name>.pt
    datasets_dir: Path | None = None   # cifar-10-batches-py, fashion-mnist IDX files, ...
    allow_download: bool = True

    # Object storage (docs/deployment-cluster.md). Credentials, and the endpoint when
    # s3_endpoint_url is unset, come from boto3's standard chain: AWS_ACCESS_KEY_ID /
    # AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws/*, AWS_ENDPOINT_URL_S3, instance or pod roles.
    s3_bucket: str | None = None
    s3_prefix: str = ""                            # e.g. "robustify/": keys are <prefix>sha256/ab/<hex>
    s3_endpoint_url: str | None = None             # MinIO, Ceph RGW, R2, ...; None: AWS or the env chain
    s3_region: str | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"   # most MinIO setups need "path"
    s3_multipart_chunk_bytes: int = 64 * 1024 * 1024  # files above this upload and download in parts
    s3_max_concurrency: int = 8                    # parts in flight per transfer
    s3_max_attempts: int = 5                       # per request, with backoff (botocore "standard" retries)
    # Downloads: 0 streams the bytes through the API (clients need no route to the bucket);
    # N > 0 answers 307 with a presigned URL valid N seconds (the API moves no artifact bytes).
    s3_presign_seconds: int = 0
    s3_presign_endpoint_url: str | None = None     # the bucket's address as clients see it, if different
    # A worker's local copies of models, data sets and training states (keyed by sha256).
    cache_dir: Path | None = None
    cache_max_bytes: int = 20 * 1024 ** 3

    # auto: off only for the embedded default while the server listens on loopback addresses only
    # (decided from the sockets actually bound, see api/binding.py); on behind anything else.
    auth: Literal["auto", "on", "off"] = "auto"
    host: str = "127.0.0.1"   # where `robustify serve` binds
    # Host names the server answers for (comma-separated; "*.example.com" matches its subdomains),
    # checked with keys on or off whenever set (api/guards.py); loopback names always pass. Unset:
    # any Host with keys on, loopback names only for a key-less server on loopback.
    allowed_hosts: str = ""
    # The operator's bearer token: with keys on, /metrics answers only to it, and /readyz shows its
    # checks only to it or to an API key (docs/operations.md, "What is public").
    operator_token: str | None = None
    port: int = 8000

    # --- request limits (all checked before the request reaches the database) ---------------
    max_upload_bytes: int = 512 * 1024 * 1024        # a multipart upload (model weights, .npz, archive)
    max_json_bytes: int = 1024 * 1024                # a JSON body; checked before auth and parsing
    max_json_depth: int = 32                         # nesting of a JSON body
    max_metadata_bytes: int = 16 * 1024              # `metadata` of a job, model or data set
    max_dataset_bytes: int = 4 * 1024**3             # decoded arrays of an uploaded data set (.npz or archive)
    # image-folder uploads (.zip / .tar, core/engine/data/imagefolder.py): the members' uncompressed total,
    # width × height of one image (Pillow's own decompression-bomb limit), one member's uncompressed size
    # (the most one read holds in memory), the member count, and the compression ratio of a large member
    # (a tar: of the whole archive). All are checked from headers, before a member's bytes are read.
    max_archive_bytes: int = 2 * 1024 * 1024 * 1024
    max_image_pixels: int = 89_478_485
    max_archive_member_bytes: int = 64 * 1024 * 1024
    max_archive_members: int = 200_000
    max_archive_ratio: float = 200.0
    # --- load: requests beyond max_concurrent_requests wait up to request_queue_seconds for a
    # slot, then get 503 + Retry-After (never an unbounded hang); a database connection that is
    # not free within db_pool_timeout_seconds is a 503 too.
    max_concurrent_requests: int = 32
    request_queue_seconds: float = 10.0
    max_event_streams: int = 100                     # open Server-Sent Events streams
    # One caller's fair share (api/tenants.py): per API key (all key-less callers together are one
    # caller), beyond which it gets 429 too_many_requests while other keys still get theirs.
    max_streams_per_key: int = 16                    # of the max_event_streams
    max_uploads_per_key: int = 4                     # multipart uploads in progress (each holds a request slot)
    db_pool_size: int = 10
    db_max_overflow: int = 30
    db_pool_timeout_seconds: float = 5.0
    # /readyz fails below this free space in a directory store: min_free_bytes when set, else
    # min_free_fraction of the disk, kept within [256 MiB, 10 GiB] (required_free_bytes).
    min_free_bytes: int | None = None
    min_free_fraction: float = 0.02

    # GPUs one fine-tuning job uses when it does not say (`devices`): with CUDA_VISIBLE_DEVICES=0,1,2,3
    # and 4 here, one worker runs each job on all four GPUs (worker/ddp.py).
    devices_per_job: int = 1

    gpu_queue: str = "gpu"
    cpu_queue: str = "cpu"
    max_attempts: int = 3
    # Jobs one API key may have queued (not yet started) at once: a fair share of the queue, so one
    # tenant cannot bury the others' jobs; beyond it a submit is 429 too_many_queued_jobs.
    max_queued_jobs_per_key: int = 100
    heartbeat_seconds: float = 5.0
    stale_heartbeat_seconds: float = 60.0
    progress_interval_seconds: float = 2.0
    visibility_timeout_seconds: int = 7 * 24 * 3600
    # recovery sweep (worker/sweep.py): how often, when a queued job's message counts as lost,
    # and how often such a job is re-sent at most
    sweep_seconds: float = 30.0
    queued_requeue_seconds: float = 60.0
    queued_resend_seconds: float = 600.0

    # Server-Sent Events: how often the stream polls the database, and comment keep-alives
    # so proxies do not close an idle stream.
    sse_poll_seconds: float = 0.5
    sse_keepalive_seconds: float = 15.0

    # Logs (core/service/logs.py): "json" writes one JSON object a line, with the job context.
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    # Webhooks (core/service/webhooks.py, worker/webhooks.py). A target must be a globally routable
    # address or lie in webhook_allow_networks (comma-separated CIDRs; SSRF: the workers sit inside
    # the operator's network); webhook_allow_private adds the RFC 1918, loopback and unique-local
    # ranges. Metadata addresses and this service's database and broker ports are always refused
    # (core/service/netpolicy.py).
    webhook_allow_networks: str = ""
    webhook_allow_private: bool = False

    def required_free_bytes(self, disk_total: int) -> int:
        """The free space /readyz asks of a store on a disk of `disk_total` bytes: a fixed amount
        would be most of a small disk and nothing on a large one."""
        if self.min_free_bytes is not None:
            return self.min_free_bytes
        return int(min(max(disk_total * self.min_free_fraction, 256 * 1024**2), 10 * 1024**3))

    @field_validator("webhook_allow_networks")
    @classmethod
    def _networks_parse(cls, value: str) -> str:
        parse_networks(value)  # a bad entry stops the service at start, naming the entry
        return value
    webhook_timeout_seconds: float = 15.0
    webhook_max_attempts: int = 8
    webhook_retry_base_seconds: float = 5.0      # first retry after about this, doubling each time
    webhook_retry_max_seconds: float = 6 * 3600.0
    webhook_poll_seconds: float = 1.0
    # The address clients reach the API at, for absolute links in webhook payloads.
    public_url: str | None = None

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'robustify.db').resolve()}"

    @property
    def is_embedded(self) -> bool:
        return self.database_url is None or self.database_url.startswith("sqlite")

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.data_dir / "artifacts").resolve()

    @property
    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or self.data_dir / "cache").resolve()

    @property
    def resolved_model_dir(self) -> Path:
        return (self.model_dir or self.data_dir / "models").resolve()

    @property
    def resolved_datasets_dir(self) -> Path:
        return (self.datasets_dir or self.data_dir / "datasets").resolve()

    @property
    def auth_decided(self) -> bool | None:
        """Whether API keys are required, when the settings alone decide; None for `auto` on the
        embedded default, where the addresses the server listens on decide (api/binding.py)."""
        if self.auth == "auto":
            return None if self.is_embedded else True
        return self.auth == "on"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
