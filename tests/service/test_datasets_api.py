"""/v1/datasets: .npz uploads validated with numpy only (no pickle), nothing stored when bad."""
from __future__ import annotations

import io

import numpy as np
import pytest

from core.db import Artifact, Dataset, Job
from tests.service.conftest import store_files
from tests.service.payloads import npz_bytes, safetensors_bytes
from tests.service.test_models_api import assert_problem


def upload(client, headers, data: bytes, **fields):
    return client.post("/v1/datasets", headers=headers, data=fields,
                       files={"file": ("tiny.npz", data, "application/octet-stream")})


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_upload_describes_the_data(client, keys, db):
    resp = upload(client, keys["a"]["headers"], npz_bytes(n=30, shape=(8, 8, 3)), name="rgb")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["object"] == "dataset" and ds["status"] == "ready" and ds["name"] == "rgb"
    assert ds["num_examples"] == 30 and ds["num_classes"] == 10 and ds["image_shape"] == [3, 8, 8]
    chw = upload(client, keys["a"]["headers"], npz_bytes(n=12, shape=(1, 8, 8))).json()
    assert chw["image_shape"] == [1, 8, 8]
    gray = upload(client, keys["a"]["headers"], npz_bytes(n=12, shape=(8, 8))).json()
    assert gray["image_shape"] == [1, 8, 8]
    assert client.get(f"/v1/datasets/{ds['id']}", headers=keys["a"]["headers"]).json()["sha256"] == ds["sha256"]
    listed = client.get("/v1/datasets", headers=keys["a"]["headers"], params={"limit": 2}).json()
    assert [d["id"] for d in listed["data"]] == [gray["id"], chw["id"]] and listed["has_more"]

    # A model upload on this data set takes its image shape as the default input shape.
    m = client.post("/v1/models", headers=keys["a"]["headers"],
                    data={"architecture": "small-cnn", "num_classes": "10", "dataset": ds["id"]},
                    files={"file": ("m.safetensors", safetensors_bytes(), "application/octet-stream")})
    assert m.status_code == 201 and m.json()["input_shape"] == [3, 8, 8]
    # ... and a job may use it; another key may not.
    db.update(__import__("core.db", fromlist=["Model"]).Model, m.json()["id"], status="ready")
    job = client.post("/v1/jobs", headers=keys["a"]["headers"],
                      json={"type": "evaluate", "model_id": m.json()["id"], "dataset": ds["id"]})
    assert job.status_code == 202, job.text
    assert_problem(client.get(f"/v1/datasets/{ds['id']}", headers=keys["b"]["headers"]), 404, "not_found")
    body = assert_problem(client.delete(f"/v1/datasets/{ds['id']}", headers=keys["a"]["headers"]), 409, "conflict")
    assert body["job_id"] == job.json()["id"]
    db.update(Job, job.json()["id"], status="failed")
    assert client.delete(f"/v1/datasets/{ds['id']}", headers=keys["a"]["headers"]).json()["deleted"] is True
    assert_problem(client.get(f"/v1/datasets/{ds['id']}", headers=keys["a"]["headers"]), 404, "not_found")


@pytest.mark.parametrize("payload, words", [
    (npz_bytes(n=20, n_labels=19), "20 images but y has 19"),
    (_npz(x=np.zeros((4, 8, 8), np.float32), y=np.zeros(4, np.int64)), "uint8"),
    (_npz(x=np.zeros((4, 8, 8), np.uint8)), "no array named y"),
    (_npz(x=np.zeros((2, 8, 8), np.uint8), y=np.array([{"a": 1}, None], dtype=object)), "npz"),
    (b"definitely not a zip", "npz"),
])
def test_bad_npz_is_refused_and_nothing_is_stored(client, keys, db, settings, payload, words):
    rows, arts, files = db.count(Dataset), db.count(Artifact), store_files(settings)
    body = assert_problem(upload(client, keys["a"]["headers"], payload), 422, "validation_error")
    assert words in body["detail"]
    assert db.count(Dataset) == rows and db.count(Artifact) == arts and store_files(settings) == files


def test_oversize_dataset_is_413(client, keys, db, settings):
    rows, files = db.count(Dataset), store_files(settings)
    big = npz_bytes(n=(settings.max_upload_bytes // 64) + 10)
    assert_problem(upload(client, keys["a"]["headers"], big), 413, "payload_too_large")
    assert db.count(Dataset) == rows and store_files(settings) == files
