"""client.models: upload safetensors weights, add a RobustBench model, get, list, wait, download, delete."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from robustify.errors import WaitTimeoutError
from robustify.pagination import Page
from robustify.resources import Resource
from robustify.types import Deleted, Model


class Models(Resource):
    def upload(self, file: str | Path, *, architecture: str, num_classes: int, dataset: str,
               name: str | None = None, input_shape: list[int] | tuple[int, int, int] | None = None,
               metadata: dict[str, Any] | None = None, input_size: list[int] | tuple[int, int, int] | None = None,
               input_mean: list[float] | None = None, input_std: list[float] | None = None) -> Model:
        """Register a safetensors state dict. The model starts `validating`; `wait()` for `ready`.

        `input_size` [C, H, W] (`input_shape` is its former name) defaults to the data set's;
        `input_mean` / `input_std` are the per-channel normalisation the model was trained with."""
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        fields: dict[str, str] = {"architecture": architecture, "num_classes": str(num_classes), "dataset": dataset}
        if name:
            fields["name"] = name
        if input_size or input_shape:
            fields["input_size"] = ",".join(str(int(s)) for s in (input_size or input_shape or ()))
        for field, values in (("input_mean", input_mean), ("input_std", input_std)):
            if values:
                fields[field] = ",".join(str(float(v)) for v in values)
        if metadata is not None:
            fields["metadata"] = json.dumps(metadata)
        return Model.model_validate(self._t.json(
            "POST", "/v1/models", data=fields,
            files=lambda: {"file": (path.name, open(path, "rb"), "application/octet-stream")}))

    def add(self, name: str, *, dataset: str = "cifar10", threat_model: str = "Linf",
            metadata: dict[str, Any] | None = None) -> Model:
        """Register a RobustBench model by its zoo name, e.g. "Wang2023Better_WRN-28-10"."""
        body = {"source": "robustbench", "name": name, "dataset": dataset, "threat_model": threat_model,
                "metadata": metadata}
        return Model.model_validate(self._t.json("POST", "/v1/models", json=body))

    def hub(self, name: str, *, num_classes: int, dataset: str, revision: str | None = None,
            input_size: list[int] | None = None, input_mean: list[float] | None = None,
            input_std: list[float] | None = None, metadata: dict[str, Any] | None = None) -> Model:
        """Register a timm model on the Hugging Face Hub, e.g. "timm/resnet18.a1_in1k" (read from the
        worker's Hugging Face cache); the input contract defaults to the hub config's."""
        body: dict[str, Any] = {"source": "hf-hub", "name": name, "num_classes": num_classes, "dataset": dataset}
        for field, value in (("revision", revision), ("input_size", input_size), ("input_mean", input_mean),
                             ("input_std", input_std), ("metadata", metadata)):
            if value is not None:
                body[field] = list(value) if isinstance(value, tuple) else value
        return Model.model_validate(self._t.json("POST", "/v1/models", json=body))

    def get(self, model_id: str) -> Model:
        return Model.model_validate(self._t.json("GET", f"/v1/models/{model_id}"))

    def list(self, *, status: str | None = None, limit: int = 100, after: str | None = None) -> Page[Model]:
        return self._page(Model, "/v1/models", {"status": status, "limit": limit, "after": after})

    def delete(self, model_id: str) -> Deleted:
        return Deleted.model_validate(self._t.json("DELETE", f"/v1/models/{model_id}"))

    def wait(self, model_id: str, *, timeout: float | None = 600.0, poll_interval: float = 1.0) -> Model:
        """Poll until the model is no longer `validating` (ready or rejected: check `.status`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        model = self.get(model_id)
        while model.status == "validating":
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(f"model {model_id} is still validating after {timeout:g} s", last=model)
            time.sleep(poll_interval)
            model = self.get(model_id)
        return model

    def download(self, model_id: str, to: str | Path = ".") -> Path:
        """Save the weights (safetensors), sha256-verified; `to` is a folder or a file name."""
        model = self.get(model_id)
        path = self._t.download(f"/v1/models/{model_id}/content", Path(to),
                                default_name=f"{model.name or model_id}.safetensors", expected_sha256=model.sha256)
        assert path is not None
        return path
