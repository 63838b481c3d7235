"""client.datasets: upload an .npz (x uint8 images, y int labels), get, list, delete."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from robustify.pagination import Page
from robustify.resources import Resource
from robustify.types import Dataset, Deleted

BUILTIN_DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100")


class Datasets(Resource):
    def upload(self, file: str | Path, *, name: str | None = None, metadata: dict[str, Any] | None = None) -> Dataset:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        fields = {"name": name or path.name}
        if metadata is not None:
            fields["metadata"] = json.dumps(metadata)
        return Dataset.model_validate(self._t.json(
            "POST", "/v1/datasets", data=fields,
            files=lambda: {"file": (path.name, open(path, "rb"), "application/octet-stream")}))

    def get(self, dataset_id: str) -> Dataset:
        return Dataset.model_validate(self._t.json("GET", f"/v1/datasets/{dataset_id}"))

    def list(self, *, limit: int = 100, after: str | None = None) -> Page[Dataset]:
        """Uploaded data sets; the built-in ones (BUILTIN_DATASETS) need no upload."""
        return self._page(Dataset, "/v1/datasets", {"limit": limit, "after": after})

    def delete(self, dataset_id: str) -> Deleted:
        return Deleted.model_validate(self._t.json("DELETE", f"/v1/datasets/{dataset_id}"))
