"""Hostile and malformed input: every one is a 4xx problem with a stable code, decided before
the database or the artifact store sees it, and leaves nothing behind (no row, no file, no
message). Each case below once was a 500 (or a stored row the API could not show)."""
from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np
import pytest

from core.service.db import Artifact, Dataset, Job, Model
from tests.service.conftest import make_settings, store_files
from tests.service.test_models_api import assert_problem

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def settings(tmp_path_factory, pg_url, queues):
    # small caps, so that "over the limit" costs the test little
    return make_settings(tmp_path_factory.mktemp("hostile"), pg_url, queues, max_json_bytes=64 * 1024,
                         max_metadata_bytes=1024, max_dataset_bytes=1024 * 1024, max_json_depth=32)


@pytest.fixture(scope="module")
def model_id(db, keys) -> str:
    return db.add_model(keys["a"]["id"], status="ready")


def _snapshot(db, settings, queues) -> tuple[Any, ...]:
    return (db.count(Job), db.count(Model), db.count(Dataset), db.count(Artifact),
            [p.name for p in store_files(settings)], queues.length(queues.gpu), queues.length(queues.cpu))


@pytest.fixture
def nothing_stored(db, settings, queues):
    before = _snapshot(db, settings, queues)
    yield
    assert _snapshot(db, settings, queues) == before, "a refused request left a row, a file or a message"


def _job(model_id: str, **config: Any) -> dict[str, Any]:
    return {"type": "finetune", "model_id": model_id, "dataset": "digits", "config": config}


def _nested(depth: int) -> Any:
    doc: Any = {}
    for _ in range(depth):
        doc = {"a": doc}
    return doc


# --------------------------------------------------------------------------- ids, queries, headers
@pytest.mark.parametrize("method, url, status, code", [
    ("GET", "/v1/jobs/job_%00", 404, "not_found"),
    ("POST", "/v1/jobs/job_%00abc/cancel", 404, "not_found"),
    ("DELETE", "/v1/models/mdl_%00", 404, "not_found"),
    ("GET", "/v1/datasets/ds_%00", 404, "not_found"),
    ("GET", "/v1/jobs?status=%00", 422, "validation_error"),
    ("GET", "/v1/jobs?status=done", 422, "validation_error"),
    ("GET", "/v1/jobs?model_id=mdl_%00", 422, "validation_error"),
    ("GET", "/v1/models?after=mdl_%00", 422, "validation_error"),
    ("GET", "/v1/datasets?after=%00", 422, "validation_error"),
    ("GET", "/v1/jobs/job_x/events?after=9223372036854775808", 422, "validation_error"),
    ("GET", "/v1/jobs/job_x/events?after=-1", 422, "validation_error"),
])
def test_bad_ids_and_query_values(client, keys, nothing_stored, method, url, status, code):
    assert_problem(client.request(method, url, headers=keys["a"]["headers"]), status, code)


def test_a_huge_id_is_not_echoed_back(client, keys, nothing_stored):
    r = client.get("/v1/jobs/job_" + "x" * 5000, headers=keys["a"]["headers"])
    assert_problem(r, 404, "not_found")
    assert len(r.json()["detail"]) < 200 and "(5004 characters)" in r.json()["detail"]


@pytest.mark.parametrize("last_event_id", ["²", "1" * 5000, "9" * 20, "9223372036854775808", "-1", "12a"])
def test_bad_last_event_id_is_refused_before_the_stream_starts(client, keys, db, model_id, last_event_id):
    job = db.add_job(keys["a"]["id"], model_id, status="succeeded")
    r = client.get(f"/v1/jobs/{job}/events", headers={**keys["a"]["headers"], "Accept": "text/event-stream",
                                                      "Last-Event-ID": last_event_id.encode()})
    body = assert_problem(r, 422, "validation_error")
    assert "last-event-id" in body["detail"].lower() or "last-event-id" in json.dumps(body["errors"]).lower()
    ok = client.get(f"/v1/jobs/{job}/events", headers={**keys["a"]["headers"], "Accept": "text/event-stream",
                                                       "Last-Event-ID": "9223372036854775807"})
    assert ok.status_code == 200 and ok.text.startswith("retry: ")  # the largest id: a stream, empty


# --------------------------------------------------------------------------- JSON bodies
def _raw(doc: str) -> dict[str, Any]:
    return {"content": doc.encode()}


@pytest.mark.parametrize("body, status, code, words", [
    (lambda m: _raw(json.dumps(_job(m, beta=1.0)).replace("1.0", "Infinity")), 400, "bad_request", "Infinity"),
    (lambda m: _raw(json.dumps(_job(m, attack_step_ratio=1.0)).replace("1.0", "-Infinity")), 400, "bad_request",
     "Infinity"),
    (lambda m: _raw(json.dumps({**_job(m), "type": "evaluate", "config": {"deltas": [0.5]}}).replace("0.5", "NaN")),
     400, "bad_request", "NaN"),
    (lambda m: _raw(json.dumps(_job(m, beta=1.0)).replace("1.0", "1e400")), 422, "validation_error", "out of range"),
    (lambda m: _raw(json.dumps(_job(m, beta=1.0)).replace("1.0", "1" * 5000)), 400, "bad_request", "digits"),
    (lambda m: {"json": _job(m, seed=10**30)}, 422, "validation_error", "config.seed"),
    (lambda m: {"json": {**_job(m), "seed": 10**30}}, 422, "validation_error", "seed"),
    (lambda m: {"json": {**_job(m), "type": "evaluate", "config": {"deltas": [1e308]}}}, 422, "validation_error",
     "config.deltas"),
    (lambda m: {"json": _job(m, eval_wpgd_steps=10**9)}, 422, "validation_error", "config.eval_wpgd_steps"),
    (lambda m: {"json": _job(m, beta=1e9)}, 422, "validation_error", "config.beta"),
    (lambda m: {"json": {**_job(m), "dataset": "digits\u0000"}}, 422, "validation_error", "NUL"),
    (lambda m: {"json": {**_job(m), "metadata": {"k\u0000": 1}}}, 422, "validation_error", "NUL"),
    (lambda m: _raw(json.dumps({**_job(m), "metadata": {"x": "ab"}}).replace("ab", "\\ud800")), 422,
     "validation_error", "surrogate"),
    (lambda m: {"json": {**_job(m), "metadata": _nested(40)}}, 400, "bad_request", "nested deeper than 32"),
    (lambda m: {"json": {**_job(m), "metadata": {"blob": "x" * 2000}}}, 422, "validation_error",
     "ROBUSTIFY_MAX_METADATA_BYTES"),
])
def test_bad_job_bodies(client, keys, model_id, nothing_stored, body, status, code, words):
    r = client.post("/v1/jobs", headers={**keys["a"]["headers"], **JSON}, **body(model_id))
    problem = assert_problem(r, status, code)
    assert words in problem["detail"] or words in json.dumps(problem.get("errors")), problem


def test_deeply_nested_json_to_models_is_a_bad_request(client, keys, nothing_stored):
    deep = b"[" * 30_000 + b"]" * 30_000  # under the size cap: the parser recursion is what is tested
    problem = assert_problem(client.post("/v1/models", headers={**keys["a"]["headers"], **JSON}, content=deep),
                             400, "bad_request")
    assert "nested deeper" in problem["detail"]


def test_json_body_cap_comes_before_authentication(client, nothing_stored):
    big = json.dumps({"type": "finetune", "model_id": "mdl_x", "dataset": "digits",
                      "metadata": {"blob": "x" * 100_000}}).encode()
    # no API key: still a 413, decided on Content-Length before anything is read or parsed
    problem = assert_problem(client.post("/v1/jobs", content=big, headers=JSON), 413, "payload_too_large")
    assert "ROBUSTIFY_MAX_JSON_BYTES" in problem["detail"] and problem["limit"] == 64 * 1024

    def chunks():  # no Content-Length: counted while read, refused at the cap
        for _ in range(100):
            yield b"x" * 1024

    assert_problem(client.post("/v1/jobs", content=chunks(), headers=JSON), 413, "payload_too_large")
    assert_problem(client.post("/v1/jobs", content=b"{}", headers={**JSON, "Content-Length": "12x"}),
                   400, "bad_request")


# --------------------------------------------------------------------------- .npz uploads
def _npz(x: np.ndarray, y: np.ndarray, compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, x=x, y=y)
    return buf.getvalue()


def _npz_declaring(shape: tuple[int, ...]) -> bytes:
    """An .npz whose x header declares `shape` of uint8 while the file holds 64 bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        npy = io.BytesIO()
        np.lib.format.write_array_header_1_0(npy, {"descr": "|u1", "fortran_order": False, "shape": shape})
        zf.writestr("x.npy", npy.getvalue() + b"\0" * 64)
        y = io.BytesIO()
        np.save(y, np.zeros(shape[0] if shape[0] < 10 else 1, np.int64))
        zf.writestr("y.npy", y.getvalue())
    return buf.getvalue()


_IMAGES = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8), dtype=np.uint8)


@pytest.mark.parametrize("data, fields, status, code, words", [
    (_npz_declaring((10**14, 8, 8)), {}, 422, "validation_error", "declares shape"),
    (_npz(_IMAGES, np.array([0, 1, 2, 3, 4, 2**40])), {}, 422, "validation_error", "below 100000"),
    (_npz(_IMAGES, np.full(6, np.iinfo(np.uint64).max, dtype=np.uint64)), {}, 422, "validation_error", "below"),
    (_npz(_IMAGES, np.zeros(6, np.int64)), {}, 422, "validation_error", "two classes"),
    # 12 MB of pixels in a few KB: refused from the header, before anything is decompressed
    (_npz(np.zeros((4000, 32, 32, 3), np.uint8), np.arange(4000) % 10, compressed=True), {}, 413,
     "payload_too_large", "ROBUSTIFY_MAX_DATASET_BYTES"),
    (_npz(_IMAGES, np.arange(6) % 3), {"name": "bad\u0000name"}, 422, "validation_error", "NUL"),
    (_npz(_IMAGES, np.arange(6) % 3), {"metadata": "{not json"}, 422, "validation_error", "metadata"),
    (_npz(_IMAGES, np.arange(6) % 3), {"metadata": '{"x": NaN}'}, 422, "validation_error", "metadata"),
    (_npz(_IMAGES, np.arange(6) % 3), {"metadata": json.dumps(_nested(40))}, 422, "validation_error", "nested"),
])
def test_bad_dataset_uploads_store_nothing(client, keys, nothing_stored, data, fields, status, code, words):
    r = client.post("/v1/datasets", headers=keys["a"]["headers"], data=fields,
                    files={"file": ("d.npz", data, "application/octet-stream")})
    problem = assert_problem(r, status, code)
    assert words in problem["detail"], problem


def test_a_valid_upload_after_the_refusals_is_stored(client, keys, db):
    r = client.post("/v1/datasets", headers=keys["a"]["headers"], data={"name": "ok", "metadata": '{"a": 1}'},
                    files={"file": ("d.npz", _npz(_IMAGES, np.arange(6) % 3), "application/octet-stream")})
    assert r.status_code == 201, r.text
    assert r.json()["num_classes"] == 3 and r.json()["image_shape"] == [1, 8, 8]
    assert db.count(Dataset, Dataset.id == r.json()["id"]) == 1


# --------------------------------------------------------------------------- HTTP and OpenAPI
def test_options_and_wrong_methods_name_every_method_of_the_path(client, keys):
    r = client.options("/v1/jobs")
    assert r.status_code == 204 and r.headers["allow"] == "GET, OPTIONS, POST"
    assert client.options("/v1/models/mdl_x").headers["allow"] == "DELETE, GET, OPTIONS"
    assert_problem(client.options("/v1/nothing"), 404, "not_found")
    problem = assert_problem(client.put("/v1/jobs", headers=keys["a"]["headers"]), 405, "method_not_allowed")
    assert client.put("/v1/jobs").headers["allow"] == "GET, OPTIONS, POST"
    assert "GET, OPTIONS, POST" in problem["detail"]


def test_openapi_documents_the_bearer_scheme_and_problem_responses(client):
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]["bearerAuth"][
            "description"]}
    create = spec["paths"]["/v1/jobs"]["post"]
    assert create["security"] == [{"bearerAuth": []}]
    for status in ("400", "401", "404", "409", "413", "415", "422", "503"):
        content = create["responses"][status]["content"]
        assert list(content) == ["application/problem+json"], (status, content)
        assert content["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    links = create["responses"]["202"]["links"]
    assert links["get_job_v1_jobs__job_id__get"]["parameters"] == {"job_id": "$response.body#/id"}


def test_no_free_database_connection_is_a_quick_503(pg_url, queues, keys, tmp_path):
    """With every pooled connection taken, a request waits ROBUSTIFY_DB_POOL_TIMEOUT_SECONDS and gets
    503 + Retry-After instead of hanging (and is served once a connection is free)."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    app = create_app(make_settings(tmp_path, pg_url, queues, db_pool_size=1, db_max_overflow=0,
                                   db_pool_timeout_seconds=0.3))
    with TestClient(app) as c:
        holder = app.state.services.sessionmaker()
        holder.connection()  # the pool's only connection, checked out
        try:
            r = c.get("/v1/jobs", headers=keys["a"]["headers"])
            problem = assert_problem(r, 503, "service_busy")
            assert r.headers["retry-after"] == "2" and "Retry-After" in problem["detail"]
        finally:
            holder.close()
        assert c.get("/v1/jobs", headers=keys["a"]["headers"]).status_code == 200
