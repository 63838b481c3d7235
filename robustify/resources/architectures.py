"""client.architectures: the built-in architectures and the families, or a search of a family's names."""
from __future__ import annotations

from typing import Any

from robustify._base import ApiObject
from robustify.pagination import Page
from robustify.resources import Resource


class Architecture(ApiObject):
    """A name to give as `architecture` (object "architecture"), or a family (object
    "architecture_family", with its `pattern`)."""

    id: str
    object: str = "architecture"
    family: str | None = None
    description: str | None = None
    pattern: str | None = None
    variants: list[dict[str, Any]] | None = None


class Architectures(Resource):
    def list(self, *, family: str | None = None, q: str | None = None, limit: int = 100,
             after: str | None = None) -> Page[Architecture]:
        """Without arguments: the built-ins and the families. With `family` and/or `q` (part of a
        name, or a pattern with * and ?): the matching names. A server lists a family's names once,
        in the background: meanwhile it answers 503 `catalog_building` (ServiceUnavailableError)."""
        return self._page(Architecture, "/v1/architectures", {"family": family, "q": q, "limit": limit, "after": after})
