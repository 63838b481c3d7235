"""What answers without an API key while keys are on (issue 18 point 10; docs/operations.md,
"What is public"): every route of the OpenAPI document plus the pages, walked without a key,
and exactly the documented set answers with something other than 401. Also: /readyz's public
answer says only ready / not ready, /metrics answers only to the operator token, the Host list
applies with keys on, and /docs does not persist the key in the browser."""
from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core.service.db import WorkerHeartbeat, record_worker_heartbeat
from tests.service.conftest import make_settings
from tests.service.test_models_api import assert_problem

OPERATOR = "op-secret-token-for-tests"
OPERATOR_HEADERS = {"Authorization": f"Bearer {OPERATOR}"}

# The documented public set (docs/operations.md): method and path template.
PUBLIC = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"),
          ("GET", "/ui/"), ("GET", "/ui/app.js"), ("GET", "/"), ("GET", "/docs-assets/swagger-ui.css")}
PAGES = PUBLIC | {("GET", "/metrics")}


@pytest.fixture(scope="module")
def surface(tmp_path_factory: pytest.TempPathFactory, pg_url: str, queues: Any) -> Any:
    settings = make_settings(tmp_path_factory.mktemp("public"), pg_url, queues, operator_token=OPERATOR)
    with TestClient(create_app(settings), follow_redirects=False) as c:
        yield c


def _every_route(client: TestClient) -> set[tuple[str, str]]:
    spec = client.get("/openapi.json").json()
    routes = {(method.upper(), path) for path, item in spec["paths"].items() for method in item
              if method in ("get", "post", "put", "patch", "delete")}
    assert len(routes) > 20, routes  # the walk covers the API, not a stub of it
    return routes | PAGES


def _call(client: TestClient, method: str, template: str) -> int:
    path = re.sub(r"\{[^}]+\}", "x1", template)  # any id: without a key, nothing may be looked up
    body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
    return client.request(method, path, **body).status_code


def test_without_a_key_exactly_the_documented_set_answers(surface: TestClient) -> None:
    answered = {(m, p) for m, p in _every_route(surface) if _call(surface, m, p) != 401}
    assert answered == PUBLIC


def test_readyz_says_only_ready_or_not_without_a_key(surface: TestClient, keys: dict[str, Any], db: Any) -> None:
    public = assert_problem(surface.get("/readyz"), 503, "not_ready")  # no worker has beaten yet
    assert "checks" not in public and "workers" not in public["detail"]
    wrong = assert_problem(surface.get("/readyz", headers={"Authorization": "Bearer rk_not-a-key"}), 503, "not_ready")
    assert "checks" not in wrong
    for headers in (keys["a"]["headers"], OPERATOR_HEADERS):
        detailed = assert_problem(surface.get("/readyz", headers=headers), 503, "not_ready")
        assert not detailed["checks"]["workers"]["ok"] and "workers" in detailed["detail"]
    with db.Session() as s:
        record_worker_heartbeat(s, "public@test", ["gpu"])
        s.commit()
    try:
        assert surface.get("/readyz").json() == {"status": "ready"}
        ready = surface.get("/readyz", headers=keys["b"]["headers"]).json()
        assert ready["status"] == "ready" and ready["checks"]["workers"]["workers"] >= 1
        assert "free_bytes" in ready["checks"]["storage"]
    finally:
        with db.Session() as s:
            s.delete(s.get(WorkerHeartbeat, "public@test"))
            s.commit()


def test_metrics_answer_only_the_operator_token(surface: TestClient, keys: dict[str, Any], db: Any) -> None:
    db.add_job(keys["a"]["id"], db.add_model(keys["a"]["id"]), status="running")
    for headers in ({}, keys["a"]["headers"], {"Authorization": "Bearer wrong"}):
        r = surface.get("/metrics", headers=headers)
        body = assert_problem(r, 401, "unauthorized")
        assert "ROBUSTIFY_OPERATOR_TOKEN" in body["detail"] and r.headers["www-authenticate"].startswith("Bearer")
        assert "robustify_jobs" not in r.text
    text = surface.get("/metrics", headers=OPERATOR_HEADERS).text
    assert 'robustify_jobs{status="running"}' in text and "robustify_http_requests_total" in text


def test_metrics_stay_closed_when_no_operator_token_is_set(tmp_path: Any, pg_url: str, queues: Any,
                                                           keys: dict[str, Any]) -> None:
    with TestClient(create_app(make_settings(tmp_path, pg_url, queues))) as c:
        body = assert_problem(c.get("/metrics", headers=keys["a"]["headers"]), 401, "unauthorized")
        assert "no operator token is set" in body["detail"]


def test_the_host_list_applies_with_keys_on(tmp_path: Any, pg_url: str, queues: Any, keys: dict[str, Any]) -> None:
    settings = make_settings(tmp_path, pg_url, queues, allowed_hosts="api.example.com, *.robustify.test")
    h = keys["a"]["headers"]
    with TestClient(create_app(settings), base_url="http://evil.example.net") as c:
        body = assert_problem(c.get("/v1/jobs", headers=h), 403, "host_not_allowed")
        assert "ROBUSTIFY_ALLOWED_HOSTS" in body["detail"]
        assert_problem(c.get("/docs"), 403, "host_not_allowed")
        assert c.get("/healthz").status_code == 200  # probes address a pod by its IP
        for host in ("api.example.com", "api.example.com:8443", "eu.robustify.test", "localhost:8000", "127.0.0.1"):
            assert c.get("/v1/jobs", headers={**h, "Host": host}).status_code == 200, host
        assert_problem(c.get("/v1/jobs", headers={**h, "Host": "robustify.test"}), 403, "host_not_allowed")
    with TestClient(create_app(make_settings(tmp_path / "open", pg_url, queues)),
                    base_url="http://any.example.net") as c:
        assert c.get("/v1/jobs", headers=h).status_code == 200  # no list: any Host while keys are on


def test_docs_do_not_persist_the_key(surface: TestClient) -> None:
    page = surface.get("/docs").text
    assert '"persistAuthorization": false' in page and '"persistAuthorization": true' not in page
