"""client.webhooks: the endpoints that receive signed job webhooks (each with its own secret)."""
from __future__ import annotations

from robustify.pagination import Page
from robustify.resources import Resource
from robustify.types import Deleted, WebhookEndpoint


class Webhooks(Resource):
    def create(self, url: str, *, events: list[str] | None = None, default: bool = False,
               description: str | None = None) -> WebhookEndpoint:
        """Register `url`; `secret` on the result verifies the signatures. `default=True`: every job
        of this API key that names no webhook notifies this endpoint."""
        body = {"url": url, "events": events, "default": default, "description": description}
        return WebhookEndpoint.model_validate(self._t.json("POST", "/v1/webhooks", json=body))

    def get(self, endpoint_id: str) -> WebhookEndpoint:
        return WebhookEndpoint.model_validate(self._t.json("GET", f"/v1/webhooks/{endpoint_id}"))

    def list(self, *, limit: int = 100, after: str | None = None) -> Page[WebhookEndpoint]:
        return self._page(WebhookEndpoint, "/v1/webhooks", {"limit": limit, "after": after})

    def delete(self, endpoint_id: str) -> Deleted:
        return Deleted.model_validate(self._t.json("DELETE", f"/v1/webhooks/{endpoint_id}"))
