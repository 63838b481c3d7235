"""Webhooks: endpoint registration, the refusal of private targets, the event filter, signed
deliveries and their retries, against PostgreSQL and a receiver HTTP server the test starts.

The dispatcher runs in the test process here (the same class the worker's parent process runs;
tests/e2e/test_webhooks_logs_e2e.py covers it inside a real worker)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.service.db import Job, WebhookDelivery
from core.service.sessions import make_engine, make_sessionmaker
from core.storage.artifacts import ArtifactStore
from robustify.webhooks import WebhookVerificationError, verify
from tests.service.conftest import make_settings
from tests.webhook_receiver import Receiver
from worker.runtime import Runtime
from worker.webhooks import WebhookDispatcher


@pytest.fixture(scope="module")
def open_settings(tmp_path_factory, pg_url, queues):
    """An operator who allows private targets (the receiver runs on 127.0.0.1), with quick retries."""
    return make_settings(tmp_path_factory.mktemp("open"), pg_url, queues, webhook_allow_private=True,
                         webhook_retry_base_seconds=0.05, webhook_max_attempts=3)


@pytest.fixture(scope="module")
def open_client(open_settings) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app(open_settings)) as c:
        yield c


def _runtime(settings: Any) -> Runtime:
    engine = make_engine(settings.resolved_database_url)
    return Runtime(settings, engine, make_sessionmaker(engine), ArtifactStore(settings.resolved_artifact_dir),
                   os.getpid())


def _drain(dispatcher: WebhookDispatcher, db: Any, job_id: str, timeout: float = 20) -> list[WebhookDelivery]:
    """Run dispatch rounds until no delivery of the job is pending (retries wait for their time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dispatcher.run_once()
        with db.Session() as s:
            rows = list(s.query(WebhookDelivery).filter_by(job_id=job_id).order_by(WebhookDelivery.created_at))
        if rows and all(r.status != "pending" for r in rows):
            return rows
        time.sleep(0.05)
    raise AssertionError(f"deliveries of {job_id} still pending after {timeout} s")


def _hmac(secret: str, headers: dict[str, str], body: bytes) -> str:
    """The signature computed independently, from the Standard Webhooks definition."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/hook", "http://192.168.0.7/hook",
    "http://169.254.169.254/latest/meta-data", "http://[::1]/hook", "http://[::ffff:127.0.0.1]/hook",
    # not "private" in Python's sense, but not global either: metadata in 100.64.0.0/10, site-local, 6to4
    "http://100.100.100.200/", "http://[::ffff:100.100.100.200]/", "http://[fec0::1]/", "http://[2002:7f00:1::]/",
])
def test_private_targets_are_refused(client, keys, db, url):
    model_id = db.add_model(keys["a"]["id"])
    jobs_before = db.count(Job)
    r = client.post("/v1/webhooks", json={"url": url}, headers=keys["a"]["headers"])
    assert r.status_code == 422 and r.json()["code"] == "webhook_target_forbidden", r.text
    assert "ROBUSTIFY_WEBHOOK_ALLOW_NETWORKS" in r.json()["detail"]
    r = client.post("/v1/jobs", json={"type": "finetune", "model_id": model_id, "dataset": "digits",
                                      "webhook": {"url": url}}, headers=keys["a"]["headers"])
    assert r.status_code == 422 and r.json()["code"] == "webhook_target_forbidden"
    assert db.count(Job) == jobs_before  # nothing left behind
    assert client.get("/v1/webhooks", headers=keys["a"]["headers"]).json()["data"] == []


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data", "http://100.100.100.200/",  # metadata
    "http://127.0.0.1:6379/", "http://[::1]:5432/",                        # this service's broker and database
])
def test_allowing_private_networks_never_opens_metadata_or_the_service_ports(open_client, keys, url):
    r = open_client.post("/v1/webhooks", json={"url": url}, headers=keys["a"]["headers"])
    assert r.status_code == 422 and r.json()["code"] == "webhook_target_forbidden", r.text
    assert open_client.post("/v1/webhooks", json={"url": "http://127.0.0.1:8099/hook"},
                            headers=keys["a"]["headers"]).status_code == 201


def test_endpoint_registration(client, keys):
    h = keys["a"]["headers"]
    # the URL's form is the schema's (a pattern: http or https, a host): a 422 naming the field and the rule
    for url, words in (("ftp://example.com/x", "absolute http:// or https:// URL"),
                       ("0", "absolute http:// or https:// URL"),
                       ("http://user:pw@93.184.216.34/", "must not carry credentials")):
        r = client.post("/v1/webhooks", json={"url": url}, headers=h)
        assert r.status_code == 422 and r.json()["code"] == "validation_error", (url, r.text)
        assert r.json()["errors"][0]["field"] == "url" and words in r.json()["errors"][0]["msg"], r.text
    schema = client.get("/openapi.json").json()["components"]["schemas"]["WebhookEndpointCreate"]["properties"]["url"]
    assert re.search(schema["pattern"], "https://ci.example.com/hook") and not re.search(schema["pattern"], "0")
    for body, code in (({"url": "http://no-such-host.invalid/hook"}, "webhook_target_unresolvable"),
                       ({"url": "http://93.184.216.34/", "events": ["job.exploded"]}, "validation_error")):
        r = client.post("/v1/webhooks", json=body, headers=h)
        assert r.status_code == 422 and r.json()["code"] == code, (body, r.text)
    r = client.post("/v1/webhooks", json={"url": "http://93.184.216.34/hook", "events": ["job.failed"]}, headers=h)
    assert r.status_code == 201, r.text
    endpoint = r.json()
    assert endpoint["secret"].startswith("whsec_") and len(base64.b64decode(endpoint["secret"][6:])) == 32
    assert endpoint["events"] == ["job.failed"] and endpoint["default"] is False
    assert client.get(f"/v1/webhooks/{endpoint['id']}", headers=keys["b"]["headers"]).status_code == 404
    assert client.delete(f"/v1/webhooks/{endpoint['id']}", headers=h).json()["deleted"] is True
    assert client.get(f"/v1/webhooks/{endpoint['id']}", headers=h).status_code == 404


def test_signed_deliveries_filter_and_retry(open_client, open_settings, keys, db):
    h = keys["a"]["headers"]
    model_id = db.add_model(keys["a"]["id"])
    with Receiver(answers=[500]) as receiver:
        body = {"type": "finetune", "model_id": model_id, "dataset": "digits", "metadata": {"ticket": 7},
                "webhook": {"url": receiver.url, "events": ["job.started", "job.cancelled"]}}
        r = open_client.post("/v1/jobs", json=body, headers=h)
        assert r.status_code == 202, r.text
        job = r.json()
        endpoint_id = job["webhook"]["endpoint_id"]
        assert job["webhook"]["events"] == ["job.started", "job.cancelled"]
        secret = open_client.get(f"/v1/webhooks/{endpoint_id}", headers=h).json()["secret"]

        # the worker's events (written as the worker writes them); the epoch's metrics are filtered out
        db.add_event(job["id"], "status", {"status": "running", "attempt": 1})
        db.add_event(job["id"], "metrics", {"epoch": 1, "total_epochs": 2, "clean_accuracy": 0.9})
        assert open_client.post(f"/v1/jobs/{job['id']}/cancel", headers=h).json()["status"] == "cancelled"
        pending = open_client.get(f"/v1/jobs/{job['id']}/webhook-deliveries", headers=h).json()["data"]
        assert [(d["event_type"], d["status"], d["attempts"]) for d in pending] == [
            ("job.started", "pending", []), ("job.cancelled", "pending", [])]

        rows = _drain(WebhookDispatcher(_runtime(open_settings)), db, job["id"])
        assert [r.status for r in rows] == ["succeeded", "succeeded"]

    # the first POST was answered 500 and retried later with the same message id, signed anew
    got = receiver.received
    assert [g["answered"] for g in got] == [500, 204, 204]
    by_id = {r.id: [g for g in got if g["headers"]["webhook-id"] == r.id] for r in rows}
    assert [[g["answered"] for g in by_id[r.id]] for r in rows] == [[500, 204], [204]]
    assert by_id[rows[0].id][0]["body"] == by_id[rows[0].id][1]["body"]
    for g in got:
        headers = {k.lower(): v for k, v in g["headers"].items()}
        assert headers["content-type"] == "application/json"
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
        assert headers["webhook-signature"] == _hmac(secret, headers, g["body"])
        assert verify(secret, headers, g["body"])["data"]["id"] == job["id"]
    started, cancelled = (json.loads(by_id[r.id][-1]["body"]) for r in rows)
    assert started["type"] == "job.started" and started["data"]["attempt"] == 0
    assert cancelled["type"] == "job.cancelled" and cancelled["data"]["status"] == "cancelled"
    assert cancelled["data"]["metadata"] == {"ticket": 7} and cancelled["data"]["url"] == f"/v1/jobs/{job['id']}"

    with pytest.raises(WebhookVerificationError):
        verify(secret, {k.lower(): v for k, v in got[0]["headers"].items()}, got[0]["body"] + b" ")
    with pytest.raises(WebhookVerificationError):
        verify(secret, got[0]["headers"], got[0]["body"], now=time.time() + 3600)  # a replay, an hour later

    shown = open_client.get(f"/v1/jobs/{job['id']}/webhook-deliveries", headers=h).json()["data"]
    assert [[a["status_code"] for a in d["attempts"]] for d in shown] == [[500, 204], [204]]
    assert shown[0]["attempts"][0]["error"] == "HTTP 500" and shown[0]["delivered_at"]
    assert open_client.get(f"/v1/jobs/{job['id']}/webhook-deliveries", headers=keys["b"]["headers"]).status_code == 404


def test_default_endpoint_gives_up_after_max_attempts(open_client, open_settings, keys, db):
    h = keys["b"]["headers"]
    model_id = db.add_model(keys["b"]["id"])
    with Receiver(answers=[503, 503, 503]) as receiver:
        r = open_client.post("/v1/webhooks", json={"url": receiver.url, "default": True,
                                                   "events": ["job.cancelled"]}, headers=h)
        assert r.status_code == 201 and r.json()["default"] is True
        job = open_client.post("/v1/jobs", json={"type": "evaluate", "model_id": model_id, "dataset": "digits"},
                               headers=h).json()
        assert job["webhook"] == {"endpoint_id": r.json()["id"], "events": ["job.cancelled"]}
        open_client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
        (row,) = _drain(WebhookDispatcher(_runtime(open_settings)), db, job["id"])
    assert row.status == "failed" and row.attempts == open_settings.webhook_max_attempts == 3
    assert [g["answered"] for g in receiver.received] == [503, 503, 503]


def test_dispatcher_refuses_a_target_that_is_private_at_send_time(open_client, settings, keys, db):
    """Registered while allowed; the operator then forbids private targets (or the name now
    resolves inwards): nothing is sent, and the delivery fails with the reason."""
    h = keys["a"]["headers"]
    model_id = db.add_model(keys["a"]["id"])
    with Receiver() as receiver:
        job = open_client.post("/v1/jobs", json={"type": "evaluate", "model_id": model_id, "dataset": "digits",
                                                 "webhook": {"url": receiver.url}}, headers=h).json()
        open_client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
        (row,) = _drain(WebhookDispatcher(_runtime(settings)), db, job["id"])  # settings: private not allowed
    assert receiver.received == []
    assert row.status == "failed" and row.attempts == 1
    assert row.attempt_log[0]["error"].startswith("webhook_target_forbidden")


def test_backoff_grows_and_honours_retry_after(open_settings):
    dispatcher = WebhookDispatcher(_runtime(open_settings))
    try:
        base = open_settings.webhook_retry_base_seconds
        for n in (1, 2, 5):
            assert base * 2 ** (n - 1) * 0.8 <= dispatcher.backoff(n) <= base * 2 ** (n - 1) * 1.2
        assert dispatcher.backoff(1, retry_after=30) == 30
        assert dispatcher.backoff(40) == open_settings.webhook_retry_max_seconds
    finally:
        dispatcher.stop()
