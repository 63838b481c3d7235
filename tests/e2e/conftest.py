"""End-to-end fixtures: real PostgreSQL (own database), real Redis (own db index and queue names),
a live uvicorn server and live Celery worker processes, all as subprocesses with env vars.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_DB = int(os.environ.get("ROBUSTIFY_E2E_REDIS_DB", "11"))

# A tiny W-TRADES recipe: a few seconds per job on 2 CPU cores.
TINY = {"epochs": 4, "batch_size": 128, "beta": 3.0, "attack_steps": 3, "eval_examples": 200, "eval_wpgd_steps": 5,
        "eval_pgd_steps": 3, "budget_subset": 256}
THREAT = {"kind": "w2-linf", "delta": 0.1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


# ------------------------------------------------------------------------------ PostgreSQL
@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    from sqlalchemy import create_engine, text

    import migrations

    name = f"robustify_e2e_{secrets.token_hex(6)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrations.upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# ------------------------------------------------------------------------------ Redis
@pytest.fixture(scope="module")
def queues() -> Iterator[dict[str, str]]:
    """Unique queue names on their own Redis db index; their keys are removed afterwards."""
    import redis

    tag = secrets.token_hex(4)
    names = {"gpu": f"e2e-gpu-{tag}", "cpu": f"e2e-cpu-{tag}"}
    yield names
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    try:
        for key in client.scan_iter(match="*"):
            k = key.decode(errors="replace")
            # our queues and their bindings; the remote-control (pidbox) bindings our workers made
            if tag in k or k in ("_kombu.binding.celery.pidbox", "_kombu.binding_deadlines"):
                client.delete(key)
        for hash_key in (b"unacked",):  # kombu's unacked-message hash: drop only our entries
            for field, value in client.hgetall(hash_key).items():
                if tag.encode() in value:
                    client.hdel(hash_key, field)
                    client.zrem(b"unacked_index", field)
    finally:
        client.close()


# ------------------------------------------------------------------------------ service env
@pytest.fixture(scope="module")
def service_env(pg_url: str, queues: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    data_dir = tmp_path_factory.mktemp("e2e-data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTIFY_")}
    env.update({
        "ROBUSTIFY_DATA_DIR": str(data_dir),
        "ROBUSTIFY_DATABASE_URL": pg_url,
        "ROBUSTIFY_BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}",
        "ROBUSTIFY_GPU_QUEUE": queues["gpu"],
        "ROBUSTIFY_CPU_QUEUE": queues["cpu"],
        "ROBUSTIFY_AUTH": "on",
        "ROBUSTIFY_ALLOW_DOWNLOAD": "false",
        "ROBUSTIFY_HEARTBEAT_SECONDS": "1",
        "ROBUSTIFY_STALE_HEARTBEAT_SECONDS": "5",
        "ROBUSTIFY_SWEEP_SECONDS": "1",
        "ROBUSTIFY_PROGRESS_INTERVAL_SECONDS": "0.3",
        "ROBUSTIFY_SSE_POLL_SECONDS": "0.2",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


@pytest.fixture(scope="module")
def api_key(pg_url: str) -> str:
    from core.apikeys import create_api_key
    from core.db import make_engine, make_sessionmaker

    engine = make_engine(pg_url)
    try:
        with make_sessionmaker(engine)() as s:
            _, plaintext = create_api_key(s, "e2e")
            s.commit()
    finally:
        engine.dispose()
    return plaintext


@pytest.fixture(scope="module")
def api_url(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path_factory.mktemp("logs") / "api.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        env=service_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, f"API server exited: {Path(log.name).read_text()[-3000:]}"
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 30, "the API server")
        yield url
    finally:
        kill_group(proc, signal.SIGTERM)
        log.close()


@pytest.fixture(scope="module")
def client(api_url: str, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as c:
        yield c


class Workers:
    """Starts `robustify worker` processes (each its own process group) and stops them all."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, queues: str, name: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--queues", queues, "--name", f"{name}@%h",
             "--loglevel", "INFO"],
            env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log_path = self.log_dir / f"{name}.log"  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def stop_all(self) -> None:
        for proc in self.procs:
            kill_group(proc, signal.SIGKILL)


@pytest.fixture
def workers(service_env: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    w = Workers(service_env, tmp_path)
    try:
        yield w
    finally:
        w.stop_all()


@pytest.fixture(scope="module")
def cpu_worker(service_env: dict[str, str], queues: dict[str, str], tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[subprocess.Popen]:
    """Validates uploads for the whole module (it does not take fine-tuning jobs)."""
    w = Workers(service_env, tmp_path_factory.mktemp("cpu-worker"))
    proc = w.start(queues["cpu"], f"cpu-{secrets.token_hex(3)}")
    try:
        yield proc
    finally:
        w.stop_all()


# ------------------------------------------------------------------------------ a model
@pytest.fixture(scope="session")
def digits_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small-cnn trained normally on digits for a few epochs (seconds), as safetensors."""
    import torch

    from core.data import load_dataset
    from core.recipes.standard import train_standard
    from core.zoo import create_model, save_model_file

    torch.manual_seed(0)
    data = load_dataset("digits", data_dir=tmp_path_factory.mktemp("datasets"))
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, dataset="digits")
    model = train_standard(model, data, epochs=3, seed=0)
    path = tmp_path_factory.mktemp("model") / "small-cnn-digits.safetensors"
    save_model_file(model, path)
    return path


def upload_model(client: httpx.Client, path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        r = client.post("/v1/models", files={"file": (path.name, fh, "application/octet-stream")},
                        data={"architecture": "small-cnn", "num_classes": "10", "dataset": "digits",
                              "input_shape": "1,8,8", "name": "digits-cnn"})
    assert r.status_code == 201, r.text
    return r.json()


def wait_model_ready(client: httpx.Client, model_id: str, timeout: float = 90) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        m = client.get(f"/v1/models/{model_id}").json()
        assert m["status"] != "rejected", m
        return m if m["status"] == "ready" else None

    return wait_until(ready, timeout, f"model {model_id} to be ready", interval=0.3)


@pytest.fixture(scope="module")
def ready_model(client: httpx.Client, cpu_worker: subprocess.Popen, digits_model_file: Path) -> dict[str, Any]:
    return wait_model_ready(client, upload_model(client, digits_model_file)["id"])


def submit(client: httpx.Client, model_id: str, **config: Any) -> dict[str, Any]:
    body = {"type": "finetune", "model_id": model_id, "dataset": "digits", "threat_model": THREAT,
            "config": {**TINY, **config}}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = client.get(f"/v1/jobs/{job_id}/events", params={"after": after, "limit": 1000}).json()
        out += page["data"]
        if not page["has_more"]:
            return out
        after = out[-1]["id"]


def wait_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    try:
        return wait_until(done, timeout, f"job {job_id} to reach {statuses}", interval=0.3)
    except AssertionError:
        job = client.get(f"/v1/jobs/{job_id}").json()
        raise AssertionError(f"job ended as {json.dumps(job)[:2000]}\nevents: {events(client, job_id)}") from None
