"""The base of every SDK object: unknown fields are kept, so an SDK older than the server keeps working."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ApiObject(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=(), populate_by_name=True)
