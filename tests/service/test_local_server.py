"""ROBUSTIFY_AUTH=auto on the embedded default: no API keys only while the server listens on
loopback addresses, decided by the sockets actually bound (not by ROBUSTIFY_HOST); and such a
key-less local server refuses requests for other host names (DNS rebinding) and requests sent
by other web sites (cross-site form posts)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

import migrations
from api.app import create_app
from core.service.db import Artifact, Model
from core.service.settings import Settings
from tests.service.conftest import REDIS_URL, Db, LiveServer, free_port, store_files
from tests.service.payloads import safetensors_bytes
from tests.service.test_models_api import assert_problem

ROOT = Path(__file__).resolve().parents[2]
FORM = {"architecture": "small-cnn", "num_classes": "10", "dataset": "digits"}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, queues) -> Settings:
    settings = Settings(data_dir=tmp_path_factory.mktemp("local"), broker_url=REDIS_URL, gpu_queue=queues.gpu,
                        cpu_queue=queues.cpu)
    assert settings.auth == "auto" and settings.is_embedded
    migrations.upgrade(settings.resolved_database_url)
    return settings


def _upload(url: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/models", data=FORM, headers=headers, timeout=10,
                      files={"file": ("m.safetensors", safetensors_bytes(5), "application/octet-stream")})


def test_loopback_server_needs_no_key_but_only_answers_local_same_site_requests(embedded):
    db = Db(embedded.resolved_database_url)
    try:
        with LiveServer(create_app(embedded)) as live:
            assert httpx.get(f"{live.url}/v1/jobs", timeout=10).status_code == 200  # no key needed
            spec = httpx.get(f"{live.url}/openapi.json", timeout=10).json()
            assert "security" not in spec["paths"]["/v1/jobs"]["get"]
            # DNS rebinding: a page on evil.example resolves its name to 127.0.0.1
            rebound = httpx.get(f"{live.url}/v1/jobs", headers={"Host": f"evil.example:{live.port}"}, timeout=10)
            assert "127.0.0.1" in assert_problem(rebound, 403, "host_not_allowed")["detail"]
            assert httpx.get(f"{live.url}/healthz", headers={"Host": f"localhost:{live.port}"}).status_code == 200
            # a cross-site form post from a page the user visits stores nothing
            before = (db.count(Model), db.count(Artifact), store_files(embedded))
            assert_problem(_upload(live.url, Origin="https://evil.example"), 403, "origin_not_allowed")
            assert_problem(_upload(live.url, Origin="null"), 403, "origin_not_allowed")
            assert_problem(_upload(live.url, **{"Sec-Fetch-Site": "cross-site"}), 403, "origin_not_allowed")
            assert (db.count(Model), db.count(Artifact), store_files(embedded)) == before
            same_site = _upload(live.url, Origin=live.url)
            assert same_site.status_code == 201, same_site.text
    finally:
        db.close()


def test_uvicorn_on_every_interface_requires_keys(embedded, tmp_path):
    """`uvicorn --factory api.app:create_app --host 0.0.0.0` never reads ROBUSTIFY_HOST: keys are
    required because the socket it bound is not a loopback one."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTIFY_")}
    env.update(ROBUSTIFY_DATA_DIR=str(embedded.data_dir), ROBUSTIFY_BROKER_URL=REDIS_URL,
               ROBUSTIFY_HOST="127.0.0.1", PYTHONPATH=str(ROOT))
    log = tmp_path / "uvicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app",
                                 "--host", "0.0.0.0", "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(150):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.1)
        r = httpx.get(f"{url}/v1/jobs", timeout=10)
        assert_problem(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
        spec = httpx.get(f"{url}/openapi.json", timeout=10).json()
        assert spec["paths"]["/v1/jobs"]["get"]["security"] == [{"bearerAuth": []}]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def test_an_in_process_client_binds_nothing_and_gets_keys_required(embedded):
    with TestClient(create_app(embedded)) as c:
        assert_problem(c.get("/v1/jobs"), 401, "unauthorized")
