"""One class per API resource; `Client` builds them on one transport."""
from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

from robustify._transport import Transport
from robustify.pagination import Page

M = TypeVar("M", bound=BaseModel)


class Resource:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def _page(self, cls: type[M], path: str, params: dict[str, Any]) -> Page[M]:
        params = {k: v for k, v in params.items() if v is not None}

        def fetch(after: str | int | None) -> Page[M]:
            body = self._t.json("GET", path, params={**params, **({"after": after} if after is not None else {})})
            return Page([cls.model_validate(item) for item in body.get("data", [])], bool(body.get("has_more")),
                        body.get("last_id"), fetch)

        return fetch(params.pop("after", None))
