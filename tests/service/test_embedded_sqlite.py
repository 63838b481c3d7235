"""The same API on the embedded default's SQLite database with auth off (owner None).

The broker here is Redis (unique queues) so the test covers the database side; the
server-less broker belongs to the end-to-end tests of the embedded default.
"""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

import migrations
from api.app import create_app
from core.service.db import Model, record_worker_heartbeat
from core.service.settings import Settings
from tests.service.conftest import REDIS_URL, Db
from tests.service.payloads import safetensors_bytes
from tests.service.test_models_api import assert_problem


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, queues):
    settings = Settings(data_dir=tmp_path_factory.mktemp("embedded"), broker_url=REDIS_URL,
                        gpu_queue=queues.gpu, cpu_queue=queues.cpu, sse_poll_seconds=0.05, auth="off")
    assert settings.is_embedded and settings.auth_decided is False
    migrations.upgrade(settings.resolved_database_url)
    db = Db(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:
        yield client, db
    db.close()


def test_flow_without_auth_on_sqlite(embedded, queues):
    client, db = embedded
    ids = []
    for seed in range(3):
        r = client.post("/v1/models", data={"architecture": "small-cnn", "num_classes": "10", "dataset": "digits"},
                        files={"file": ("m.safetensors", safetensors_bytes(seed), "application/octet-stream")})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    first = client.get("/v1/models", params={"limit": 2}).json()
    second = client.get("/v1/models", params={"limit": 2, "after": first["last_id"]}).json()
    assert [m["id"] for m in first["data"] + second["data"]] == ids[::-1] and not second["has_more"]
    assert db.get(Model, ids[0]).owner_key_id is None

    assert_problem(client.post("/v1/jobs", json={"type": "finetune", "model_id": ids[0], "dataset": "digits"}),
                   409, "model_not_ready")
    db.update(Model, ids[0], status="ready")
    gpu = queues.length(queues.gpu)
    h = {"Idempotency-Key": "k1"}
    job = client.post("/v1/jobs", headers=h, json={"type": "finetune", "model_id": ids[0], "dataset": "digits"})
    again = client.post("/v1/jobs", headers=h, json={"type": "finetune", "model_id": ids[0], "dataset": "digits"})
    assert job.status_code == 202 and again.json()["id"] == job.json()["id"]
    assert queues.length(queues.gpu) == gpu + 1
    assert client.post(f"/v1/jobs/{job.json()['id']}/cancel").json()["status"] == "cancelled"
    events = client.get(f"/v1/jobs/{job.json()['id']}/events", headers={"Accept": "text/event-stream"}).text
    assert events.count("event: status") == 2

    assert_problem(client.get("/readyz"), 503, "not_ready")
    with db.Session() as s:
        record_worker_heartbeat(s, "w1@here")
        s.commit()
    assert client.get("/readyz").status_code == 200
