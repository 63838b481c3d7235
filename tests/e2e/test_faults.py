"""Faults under a running job, on a PostgreSQL and a Redis that this module starts itself (on free
ports, PostgreSQL as an unprivileged user): never the machine's shared servers.

- PostgreSQL stopped and Redis killed mid-job, both restarted 4 s later: the running job
  finishes without a restart (attempt 1), every epoch's checkpoint and metrics are there, and
  the job queued behind it (its message in Redis during the kill) runs too.
- SIGTERM to a worker mid-epoch (what `docker stop` does): a checkpoint, the job handed back
  to the queue with its attempt given back, the worker gone within the grace period, and
  another worker finishing the job from that checkpoint.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import (
    LIFECYCLE,
    ROOT,
    Workers,
    events,
    free_port,
    kill_group,
    start_api,
    submit,
    upload_model,
    wait_model_ready,
    wait_status,
    wait_until,
)

pytestmark = [pytest.mark.service, pytest.mark.timeout(300)]


def _unprivileged(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root."""
    return ["runuser", "-u", "nobody", "--", *cmd] if os.geteuid() == 0 else cmd


class OwnPostgres:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="robustify-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "nobody")
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/robustify"
        subprocess.run(_unprivileged(["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                                      "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)

    def start(self) -> None:
        subprocess.run(_unprivileged(["pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "start", "-o",
                                      f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"]),
                       check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run(_unprivileged(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"]), check=True,
                       capture_output=True)

    def remove(self) -> None:
        subprocess.run(_unprivileged(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


class OwnRedis:
    """redis-server with an append-only file: queued messages survive a SIGKILL, as in production."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="robustify-redis-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.dir / "log", "ab") as log:   # the server holds its own copy of the descriptor
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                                          text=True).stdout.strip() == "PONG", 10, "redis-server")

    def kill(self) -> None:
        assert self.proc is not None
        kill_group(self.proc, signal.SIGKILL)

    def remove(self) -> None:
        if self.proc is not None:
            kill_group(self.proc, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def own_pg() -> Iterator[OwnPostgres]:
    import psycopg

    import migrations

    pg = OwnPostgres()
    try:
        pg.start()
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE robustify")
        migrations.upgrade(pg.url)
        yield pg
    finally:
        pg.remove()


@pytest.fixture(scope="module")
def own_redis() -> Iterator[OwnRedis]:
    redis = OwnRedis()
    try:
        redis.start()
        yield redis
    finally:
        redis.remove()


@pytest.fixture(scope="module")
def env(own_pg: OwnPostgres, own_redis: OwnRedis, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTIFY_")}
    env.update({
        "ROBUSTIFY_DATA_DIR": str(tmp_path_factory.mktemp("faults-data")),
        "ROBUSTIFY_DATABASE_URL": own_pg.url, "ROBUSTIFY_BROKER_URL": own_redis.url,
        "ROBUSTIFY_GPU_QUEUE": "gpu", "ROBUSTIFY_CPU_QUEUE": "cpu", "ROBUSTIFY_AUTH": "on",
        "ROBUSTIFY_ALLOW_DOWNLOAD": "false", "ROBUSTIFY_HEARTBEAT_SECONDS": "1",
        # an outage shorter than this costs a running job nothing
        "ROBUSTIFY_STALE_HEARTBEAT_SECONDS": "30", "ROBUSTIFY_SWEEP_SECONDS": "2",
        "ROBUSTIFY_PROGRESS_INTERVAL_SECONDS": "0.3", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
    })
    return env


@pytest.fixture(scope="module")
def client(env: dict[str, str], own_pg: OwnPostgres,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    from core.service.apikeys import create_api_key
    from core.service.sessions import make_engine, make_sessionmaker

    engine = make_engine(own_pg.url)
    with make_sessionmaker(engine)() as s:
        _, key = create_api_key(s, "faults")
        s.commit()
    engine.dispose()
    proc, url = start_api(env, tmp_path_factory.mktemp("faults-logs") / "api.log")
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            yield c
    finally:
        kill_group(proc, signal.SIGTERM)


@pytest.fixture(scope="module")
def first_worker(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    w = Workers(env, tmp_path_factory.mktemp("faults-workers"), "faults")
    w.start("gpu,cpu", "first")
    try:
        yield w
    finally:
        w.stop_all()


@pytest.fixture(scope="module")
def model(client: httpx.Client, first_worker: Workers, digits_model_file: Path) -> str:
    return wait_model_ready(client, upload_model(client, digits_model_file)["id"])["id"]


def _checkpoint_epochs(evs: list[dict[str, Any]]) -> list[int]:
    return [e["data"]["epoch"] for e in evs if e["type"] == "checkpoint" and not e["data"]["partial"]]


def _starts(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in evs if e["type"] == "status" and e["data"].get("status") == "running"]


def test_database_and_broker_outages_cost_a_running_job_nothing(client: httpx.Client, model: str,
                                                                own_pg: OwnPostgres, own_redis: OwnRedis) -> None:
    epochs = 5
    running = submit(client, model, epochs=epochs, **LIFECYCLE)["id"]
    # queued behind it (one worker process): its message is in Redis
    behind = submit(client, model, epochs=1, **LIFECYCLE)["id"]
    wait_until(lambda: _checkpoint_epochs(events(client, running)), 120, "the first checkpoint")
    seen = len(events(client, running))

    # both down at once, for 4 s, in the middle of the job
    own_pg.stop()
    own_redis.kill()
    down = client.get(f"/v1/jobs/{running}")  # the API says so at once, and when to retry
    assert down.status_code == 503 and down.json()["code"] == "database_unavailable", down.text
    assert down.headers["retry-after"].isdigit()
    time.sleep(4)
    own_pg.start()
    own_redis.start()
    restarted = time.monotonic()
    wait_until(lambda: client.get(f"/v1/jobs/{running}").status_code == 200, 30, "the API to recover")
    api_recovery = time.monotonic() - restarted
    wait_until(lambda: len(events(client, running)) > seen, 30, "the job's writes to resume")
    job_recovery = time.monotonic() - restarted
    print(f"PostgreSQL and Redis down 4 s: the API answered {api_recovery:.2f} s after their restart, "
          f"the job's writes resumed after {job_recovery:.2f} s")

    done = wait_status(client, running, {"succeeded", "failed", "cancelled"}, 180)
    assert done["status"] == "succeeded", done
    assert done["attempt"] == 1, done  # never restarted
    evs = events(client, running)
    assert len(_starts(evs)) == 1
    assert _checkpoint_epochs(evs) == list(range(1, epochs + 1))  # nothing lost, nothing twice
    assert [e["data"]["epoch"] for e in evs if e["type"] == "metrics"] == list(range(0, epochs + 1))
    assert not any(e["level"] == "error" for e in evs)

    after = wait_status(client, behind, {"succeeded", "failed", "cancelled"}, 120)
    assert after["status"] == "succeeded" and after["attempt"] == 1, after


def test_sigterm_mid_epoch_hands_the_job_back_to_another_worker(client: httpx.Client, model: str,
                                                                first_worker: Workers, env: dict[str, str],
                                                                tmp_path: Path) -> None:
    epochs = 4
    job_id = submit(client, model, epochs=epochs, **LIFECYCLE)["id"]

    def inside_epoch_two() -> bool:
        p = client.get(f"/v1/jobs/{job_id}").json()["progress"]
        return p["phase"] == "train" and (p["epoch"] or 0) >= 2

    wait_until(inside_epoch_two, 120, "training inside epoch 2", interval=0.1)
    worker = first_worker.procs[0]
    signalled = time.monotonic()
    worker.send_signal(signal.SIGTERM)  # to the main process only, as docker stop (through tini) does
    assert worker.wait(timeout=60) == 0, first_worker.log(worker)[-3000:]
    grace = time.monotonic() - signalled

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["attempt"] == 0, job  # handed back, its attempt given back
    evs = events(client, job_id)
    back = [e for e in evs if e["type"] == "status" and e["data"].get("reason") == "handed_back"]
    assert len(back) == 1
    partial = [e for e in evs if e["type"] == "checkpoint" and e["data"]["partial"]]
    assert partial and partial[-1]["id"] < back[0]["id"]  # the stopped epoch was saved first

    second = Workers(env, tmp_path, "faults")
    second.start("gpu,cpu", "second")
    try:
        done = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 150)
    finally:
        second.stop_all()
    assert done["status"] == "succeeded" and done["attempt"] == 1, done
    evs = events(client, job_id)
    starts = _starts(evs)
    assert len(starts) == 2 and starts[0]["data"]["worker_id"] != starts[1]["data"]["worker_id"]
    assert _checkpoint_epochs(evs) == list(range(1, epochs + 1))
    assert any("resumed_from_epoch" in (e["data"] or {}) for e in evs)
    print(f"SIGTERM: worker gone {grace:.1f} s later, the job finished on another worker")
