"""/healthz, /readyz, /metrics, problem responses for unknown routes and methods, OpenAPI."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core.service.db import Model, WorkerHeartbeat, record_worker_heartbeat
from tests.service.conftest import free_port, make_settings
from tests.service.payloads import safetensors_bytes
from tests.service.test_models_api import assert_problem
from tests.tmpfs import tmpfs


def test_healthz_and_unknown_routes(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert_problem(client.get("/v1/nothing-here"), 404, "not_found")
    assert_problem(client.put("/healthz"), 405, "method_not_allowed")
    spec = client.get("/openapi.json").json()
    assert "/v1/jobs/{job_id}/events" in spec["paths"]
    assert "multipart/form-data" in spec["paths"]["/v1/models"]["post"]["requestBody"]["content"]


def test_readyz_needs_a_worker_heartbeat(client, db, keys):
    h = keys["a"]["headers"]  # without a key, /readyz says only ready or not (test_public_surface.py)
    body = assert_problem(client.get("/readyz", headers=h), 503, "not_ready")
    assert body["checks"]["database"]["ok"] and body["checks"]["broker"]["ok"]
    assert not body["checks"]["workers"]["ok"] and "robustify worker" in body["checks"]["workers"]["error"]
    with db.Session() as s:
        record_worker_heartbeat(s, "gpu0@test", ["gpu"])
        s.commit()
    try:
        ok = client.get("/readyz", headers=h)
        assert ok.status_code == 200, ok.text
        assert ok.json()["checks"]["workers"]["workers"] == 1
    finally:
        with db.Session() as s:
            s.delete(s.get(WorkerHeartbeat, "gpu0@test"))
            s.commit()


def test_readyz_names_a_broken_broker(pg_url, queues, keys, tmp_path):
    settings = make_settings(tmp_path, pg_url, queues, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(settings)) as c:
        body = assert_problem(c.get("/readyz", headers=keys["a"]["headers"]), 503, "not_ready")
    assert body["checks"]["database"]["ok"] and not body["checks"]["broker"]["ok"]
    assert "broker" in body["detail"]


def test_metrics_count_requests_by_route_and_jobs_by_status(pg_url, queues, keys, db, tmp_path):
    model = db.add_model(keys["a"]["id"])
    db.add_job(keys["a"]["id"], model, status="running")
    with TestClient(create_app(make_settings(tmp_path, pg_url, queues, operator_token="op"))) as client:
        client.get("/v1/jobs/job_x1", headers=keys["a"]["headers"])
        client.get("/v1/jobs/job_x2", headers=keys["a"]["headers"])
        text = client.get("/metrics", headers={"Authorization": "Bearer op"}).text  # the operator's token
    assert 'robustify_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 2.0' in text
    assert "robustify_http_request_duration_seconds_bucket" in text
    assert 'robustify_jobs{status="running"} 1.0' in text
    assert 'robustify_jobs{status="queued"} 0.0' in text


def test_unmigrated_database_is_a_clear_503(tmp_path, queues):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'empty.db'}", queues, auth="off")
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        body = assert_problem(c.get("/v1/jobs"), 503, "database_not_migrated")
    assert "robustify migrate" in body["detail"]


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs: the artifact store of a server whose disk is (nearly) full."""
    with tmpfs(tmp_path / "store", "512k") as mount:
        yield mount


def test_full_disk_is_a_clear_507_and_readyz_says_so(pg_url, queues, keys, db, small_disk, tmp_path):
    settings = make_settings(tmp_path, pg_url, queues, artifact_dir=small_disk, max_upload_bytes=4 * 1024 * 1024,
                             min_free_bytes=1024 * 1024)
    models = db.count(Model)
    with TestClient(create_app(settings)) as c:
        ready = assert_problem(c.get("/readyz", headers=keys["a"]["headers"]), 503, "not_ready")
        storage = ready["checks"]["storage"]
        assert not storage["ok"] and storage["free_bytes"] < 1024 * 1024
        assert "ROBUSTIFY_MIN_FREE_BYTES" in storage["error"]
        big = safetensors_bytes(0) + b"\0" * (1024 * 1024)  # larger than the disk
        r = c.post("/v1/models", headers=keys["a"]["headers"], data={"architecture": "small-cnn", "num_classes": "10",
                                                                      "dataset": "digits"},
                   files={"file": ("m.safetensors", big, "application/octet-stream")})
        problem = assert_problem(r, 507, "storage_full")
        assert "ROBUSTIFY_ARTIFACT_DIR" in problem["detail"] and str(small_disk) not in problem["detail"]
    assert db.count(Model) == models
    assert not [p for p in small_disk.rglob("*") if p.is_file()], "the partial upload was left on the disk"
