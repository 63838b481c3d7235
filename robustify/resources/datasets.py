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
    def upload(self, file: str | Path, *, name: str | None = None, metadata: dict[str, Any] | None = None,
               image_size: int | tuple[int, int] | None = None, channels: int | None = None,
               test_fraction: float | None = None, seed: int | None = None) -> Dataset:
        """An .npz (x uint8 images, y int labels), or a .zip / .tar of class folders; the other
        options apply to folders only: `image_size` (S or (H, W)), `channels` (1 or 3), and for
        folders without train/ and test/ the held-out `test_fraction` and the `seed` of that split."""
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        fields = {"name": name or path.name}
        if metadata is not None:
            fields["metadata"] = json.dumps(metadata)
        if image_size is not None:
            fields["image_size"] = ",".join(map(str, image_size)) if isinstance(image_size, (tuple, list)) \
                else str(image_size)
        for field, value in (("channels", channels), ("test_fraction", test_fraction), ("seed", seed)):
            if value is not None:
                fields[field] = str(value)
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
