"""`robustify keys create|list|revoke` as a real process against a migrated PostgreSQL database;
the key it prints opens the API (auth on, same database) until it is revoked."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from tests.service.conftest import make_settings
from tests.service.test_models_api import assert_problem

ROOT = Path(__file__).resolve().parents[2]


def keys(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTIFY_")}
    env.update(ROBUSTIFY_DATABASE_URL=url, ROBUSTIFY_DATA_DIR=str(tmp_path / "cli-data"))
    return subprocess.run([sys.executable, "-m", "cli", "keys", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def client(tmp_path, pg_url, queues):
    with TestClient(create_app(make_settings(tmp_path / "api", pg_url, queues))) as c:
        yield c


def test_keys_create_list_revoke_against_the_api(tmp_path, pg_url, client):
    made = keys(tmp_path, pg_url, "create", "ci-bot")
    assert made.returncode == 0, made.stderr
    plaintext = made.stdout.strip()
    assert plaintext.startswith("rk_") and "\n" not in plaintext  # stdout is the key alone
    assert "shown once" in made.stderr

    auth = {"Authorization": f"Bearer {plaintext}"}
    r = client.get("/v1/models", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["data"] == []
    assert_problem(client.get("/v1/models"), 401, "unauthorized")

    listed = keys(tmp_path, pg_url, "list")
    assert listed.returncode == 0, listed.stderr
    (line,) = [ln for ln in listed.stdout.splitlines() if ln.endswith("ci-bot")]
    key_id, prefix, state = line.split()[:3]
    assert state == "active" and plaintext.startswith(prefix.rstrip("…"))

    revoked = keys(tmp_path, pg_url, "revoke", key_id)
    assert revoked.returncode == 0 and revoked.stdout.strip() == f"revoked {key_id}", revoked.stderr
    assert_problem(client.get("/v1/models", headers=auth), 401, "unauthorized")
    assert "revoked" in keys(tmp_path, pg_url, "list").stdout.split(key_id, 1)[1].splitlines()[0]

    again = keys(tmp_path, pg_url, "revoke", key_id)
    assert again.returncode == 1 and "no active key" in again.stderr
    nameless = keys(tmp_path, pg_url, "create")
    assert nameless.returncode == 2 and "Missing argument 'NAME'" in nameless.stderr
    assert not (tmp_path / "cli-data").exists() or not any((tmp_path / "cli-data").glob("*.db"))
