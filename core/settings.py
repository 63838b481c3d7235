"""Service settings, from environment variables prefixed ROBUSTIFY_ (pydantic-settings).

With nothing set, everything lives under one data directory (the embedded default): a SQLite
database, a server-less broker and the artifact store. ROBUSTIFY_DATABASE_URL (PostgreSQL) and
ROBUSTIFY_BROKER_URL (Redis) switch the same code to the distributed deployment.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROBUSTIFY_", extra="ignore")

    data_dir: Path = Path("robustify-data")
    database_url: str | None = None
    broker_url: str | None = None
    artifact_dir: Path | None = None
    model_dir: Path | None = None      # RobustBench weights: <model_dir>/<dataset>/<threat>/<name>.pt
    datasets_dir: Path | None = None   # cifar-10-batches-py, fashion-mnist IDX files, ...
    allow_download: bool = True

    auth: Literal["auto", "on", "off"] = "auto"  # auto: off only for the embedded default on localhost
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 512 * 1024 * 1024
    # image-folder uploads (.zip / .tar, core/imagefolder.py): the members' uncompressed total,
    # width × height of one image (Pillow's own decompression-bomb limit), and the decoded arrays
    max_archive_bytes: int = 2 * 1024 * 1024 * 1024
    max_image_pixels: int = 89_478_485
    max_dataset_bytes: int = 2 * 1024 * 1024 * 1024

    gpu_queue: str = "gpu"
    cpu_queue: str = "cpu"
    max_attempts: int = 3
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

    # Logs (core/logs.py): "json" writes one JSON object a line, with the job context.
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    # Webhooks (core/webhooks.py, worker/webhooks.py). Targets on loopback, private and
    # link-local addresses are refused unless webhook_allow_private (SSRF: the workers sit
    # inside the operator's network).
    webhook_allow_private: bool = False
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
    def resolved_model_dir(self) -> Path:
        return (self.model_dir or self.data_dir / "models").resolve()

    @property
    def resolved_datasets_dir(self) -> Path:
        return (self.datasets_dir or self.data_dir / "datasets").resolve()

    @property
    def auth_enabled(self) -> bool:
        if self.auth == "auto":
            return not (self.is_embedded and self.host in ("127.0.0.1", "localhost", "::1"))
        return self.auth == "on"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
