"""`Client`: the entry point of the SDK."""
from __future__ import annotations

import os
from typing import Any

import httpx

from robustify._transport import Transport
from robustify._version import __version__
from robustify.resources.architectures import Architectures
from robustify.resources.datasets import Datasets
from robustify.resources.jobs import Jobs
from robustify.resources.models import Models
from robustify.resources.webhooks import Webhooks

DEFAULT_URL = "http://127.0.0.1:8000"


class Client:
    """A robustify server's API.

        from robustify import Client
        with Client("http://gpu-box:8000", api_key="rk_…") as client:
            job = client.jobs.create(type="finetune", model_id="mdl_…", dataset="digits",
                                     threat_model={"kind": "w2-linf", "delta": "8/255"})
            job = client.jobs.wait(job.id)

    `base_url` and `api_key` default to ROBUSTIFY_URL and ROBUSTIFY_API_KEY. `timeout` (seconds,
    or an httpx.Timeout) bounds each request; `max_retries` bounds the retries of requests
    that failed to connect or met a 503 (see robustify._transport for which requests).
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout = 60.0, max_retries: int = 3,
                 http_client: httpx.Client | None = None) -> None:
        self.base_url = (base_url or os.environ.get("ROBUSTIFY_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("ROBUSTIFY_API_KEY")
        self._transport = Transport(self.base_url, key or None, timeout=timeout, max_retries=max_retries,
                                    http_client=http_client, user_agent=f"robustify-python/{__version__}")
        self.models = Models(self._transport)
        self.datasets = Datasets(self._transport)
        self.jobs = Jobs(self._transport)
        self.webhooks = Webhooks(self._transport)
        self.architectures = Architectures(self._transport)

    def ready(self) -> dict[str, Any]:
        """GET /readyz: database, broker and workers (ServiceUnavailableError when one is down)."""
        readiness: dict[str, Any] = self._transport.json("GET", "/readyz")
        return readiness

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.base_url!r})"
