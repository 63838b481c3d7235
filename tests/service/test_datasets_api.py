"""/v1/datasets: .npz uploads validated with numpy only (no pickle), nothing stored when bad."""
from __future__ import annotations

import io

import numpy as np
import pytest

from core.service.db import Artifact, Dataset, Job
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
    db.update(__import__("core.service.db", fromlist=["Model"]).Model, m.json()["id"], status="ready")
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


# --- image-folder archives -----------------------------------------------------------------------

ARCHIVE_CAP = 128 * 1024


@pytest.fixture(scope="module")
def settings(tmp_path_factory, pg_url, queues):
    """This module's server caps an archive's uncompressed total at 128 KiB (under the 256 KiB upload cap)."""
    from tests.service.conftest import make_settings

    return make_settings(tmp_path_factory.mktemp("data"), pg_url, queues, max_archive_bytes=ARCHIVE_CAP)


def upload_archive(client, headers, data: bytes, filename: str = "photos.zip", **fields):
    return client.post("/v1/datasets", headers=headers, data=fields,
                       files={"file": (filename, data, "application/octet-stream")})


def test_image_folder_zip_becomes_a_data_set_with_class_names(client, keys, db, settings):
    from core.engine.data.npz import read_npz_dataset
    from tests.archives import CLASSES, folder_entries, zip_bytes

    h = keys["a"]["headers"]
    resp = upload_archive(client, h, zip_bytes(folder_entries(per_class=5, root="photos/")), image_size="24",
                          test_fraction="0.2", seed="7")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["name"] == "photos" and ds["class_names"] == list(CLASSES) and ds["num_classes"] == 3
    assert ds["image_shape"] == [3, 24, 24] and ds["num_examples"] == 15
    assert ds["splits"] == {"train": 12, "test": 3}
    assert client.get(f"/v1/datasets/{ds['id']}", headers=h).json()["class_names"] == list(CLASSES)
    # stored in the project's own format: an .npz with its split and class names
    stored = settings.resolved_artifact_dir / "sha256" / ds["sha256"][:2] / ds["sha256"]
    npz = read_npz_dataset(stored)
    assert npz.class_names == list(CLASSES) and npz.x.shape == (12, 3, 24, 24) and npz.x_test.shape == (3, 3, 24, 24)
    assert not list((settings.resolved_artifact_dir / "tmp").glob("*"))   # upload and conversion temp files gone
    # a model registered on it defaults to its image size
    m = client.post("/v1/models", headers=h, data={"architecture": "timm:resnet18", "num_classes": "3",
                                                    "dataset": ds["id"]},
                    files={"file": ("m.safetensors", safetensors_bytes(), "application/octet-stream")})
    assert m.status_code == 201 and m.json()["input_size"] == [3, 24, 24]


def test_train_and_test_tar_keeps_its_split_in_grayscale(client, keys):
    from tests.archives import folder_entries, tar_bytes

    resp = upload_archive(client, keys["a"]["headers"], tar_bytes(folder_entries(per_class=4, split=True)),
                          filename="scans.tar", image_size="16,20", channels="1", name="scans")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["image_shape"] == [1, 16, 20] and ds["splits"] == {"train": 12, "test": 6} and ds["name"] == "scans"


@pytest.mark.parametrize("fields, field", [
    ({"image_size": "tiny"}, "image_size"), ({"image_size": "4"}, "image_size"), ({"channels": "2"}, "channels"),
    ({"test_fraction": "1.5"}, "test_fraction"), ({"seed": "-1"}, "seed"),
])
def test_bad_archive_options_are_422(client, keys, db, settings, fields, field):
    from tests.archives import folder_entries, zip_bytes

    rows, files = db.count(Dataset), store_files(settings)
    body = assert_problem(upload_archive(client, keys["a"]["headers"], zip_bytes(folder_entries(per_class=2)),
                                         **fields), 422, "validation_error")
    assert body["errors"][0]["field"] == field
    assert db.count(Dataset) == rows and store_files(settings) == files


def test_archive_options_do_not_apply_to_npz(client, keys):
    body = assert_problem(upload(client, keys["a"]["headers"], npz_bytes(n=12), image_size="32"), 422,
                          "validation_error")
    assert "image_size" in body["detail"] and ".zip" in body["detail"]


@pytest.mark.parametrize("name", sorted(__import__("tests.archives", fromlist=["x"]).bad_archives(ARCHIVE_CAP)))
def test_every_bad_archive_is_refused_with_its_code_and_nothing_is_kept(client, keys, db, settings, name):
    from tests.archives import bad_archives

    code, data = bad_archives(ARCHIVE_CAP)[name]
    assert len(data) < settings.max_upload_bytes   # refused for what it holds, not for its size
    rows, arts, files = db.count(Dataset), db.count(Artifact), store_files(settings)
    filename = "bad.tar" if data[257:262] == b"ustar" else "bad.zip"
    assert_problem(upload_archive(client, keys["a"]["headers"], data, filename=filename, image_size="16"), 422, code)
    assert db.count(Dataset) == rows and db.count(Artifact) == arts and store_files(settings) == files
