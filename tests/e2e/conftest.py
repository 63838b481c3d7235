"""End-to-end fixtures: real PostgreSQL (own database), real Redis (own db index and queue names),
a live uvicorn server and live Celery worker processes, all as subprocesses with env vars.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
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

# A tiny W-TRADES recipe: a few seconds per job on 2 CPU cores (11 steps per epoch on digits' 1,150
# training images left after the validation split).
# seed 1: at lr 0.01 this small CNN's first W-TRADES epoch falls apart on some seeds (0 and 2 here; seed 1
# gains W2 +0.14 on the test split, interval [+0.08, +0.20]); these tests check the service's flow, which
# needs a run that improves, decided by the paired interval.
# The before/after is the "quick" ensemble on a 200-image stratified sample of the test split: the
# "standard" one on all 360 test images took 237 s of a 271 s job here (machine loaded), quick on 200
# images 22 s of a 37 s job (seed 1 still improves: W2 +0.120, paired interval [+0.04, +0.20]). The
# standard preset is the README example's and tests/core's business.
TINY = {"epochs": 4, "batch_size": 96, "lr": 0.01, "beta": 3.0, "attack_steps": 3, "validation_examples": 200,
        "eval_wpgd_steps": 5, "eval_pgd_steps": 3, "test_wpgd_steps": 10, "test_pgd_steps": 3, "budget_subset": 256,
        "seed": 1, "evaluation": "quick", "test_examples": 200}
THREAT = {"kind": "w2-linf", "delta": 0.1}
# Jobs that a test kills, stops, resumes or runs through an outage are judged by their epochs, checkpoints
# and attempts, never by their verdict: their before/after measures 60 test images (a third of TINY's 200,
# which decide a verdict), 6 per class of the stratified sample.
LIFECYCLE = {"test_examples": 60}


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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
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
def _mentions(client: Any, key: bytes, tag: bytes) -> bool:
    """Whether a key's name or any of its members/fields/values carries `tag`."""
    if tag in key:
        return True
    kind = client.type(key)
    if kind == b"set":
        items: Any = client.smembers(key)
    elif kind == b"zset":
        items = client.zrange(key, 0, -1)
    elif kind == b"hash":
        items = [b for pair in client.hgetall(key).items() for b in pair]
    elif kind == b"list":
        items = client.lrange(key, 0, -1)
    elif kind == b"string":
        items = [client.get(key) or b""]
    else:
        items = []
    return any(tag in item for item in items)


@pytest.fixture(scope="module")
def queues() -> Iterator[dict[str, str]]:
    """Unique queue and worker names on their own Redis db index.

    Afterwards the keys named after this run are deleted, and so are this run's entries in kombu's
    shared unacked hash (a SIGKILLed worker leaves them). Nothing global is deleted: other runs may
    share the db. The workers run without remote control, mingle and gossip, so no other key may
    mention this run; the teardown checks that.
    """
    import redis

    tag = secrets.token_hex(4)
    names = {"gpu": f"e2e-gpu-{tag}", "cpu": f"e2e-cpu-{tag}", "tag": tag}
    yield names
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    try:
        btag = tag.encode()
        for key in client.scan_iter(match=f"*{tag}*"):
            client.delete(key)
        for field, value in client.hgetall(b"unacked").items():  # kombu's unacked-message hash
            if btag in value:
                client.hdel(b"unacked", field)
                client.zrem(b"unacked_index", field)
        left = [k.decode(errors="replace") for k in client.scan_iter(match="*") if _mentions(client, k, btag)]
        assert not left, f"Redis keys still mention this run ({tag}): {left}"
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
    from core.service.apikeys import create_api_key
    from core.service.sessions import make_engine, make_sessionmaker

    engine = make_engine(pg_url)
    try:
        with make_sessionmaker(engine)() as s:
            _, plaintext = create_api_key(s, "e2e")
            s.commit()
    finally:
        engine.dispose()
    return plaintext


def start_api(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """`uvicorn --factory api.app:create_app` as a subprocess (its own process group), once it answers."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, f"API server exited: {log_path.read_text()[-3000:]}"
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 30, "the API server")
    except BaseException:
        kill_group(proc)
        raise
    return proc, url


@pytest.fixture(scope="module")
def api_url(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_api(service_env, tmp_path_factory.mktemp("logs") / "api.log")
    try:
        yield url
    finally:
        kill_group(proc, signal.SIGTERM)


@pytest.fixture(scope="module")
def client(api_url: str, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as c:
        yield c


class Workers:
    """Starts `robustify worker` processes (each its own process group) and stops them all.

    Worker names carry the run's tag, so any broker key a worker leaves behind can be traced to it."""

    def __init__(self, env: dict[str, str], log_dir: Path, tag: str) -> None:
        self.env, self.log_dir, self.tag = env, log_dir, tag
        self.procs: list[subprocess.Popen] = []

    def start(self, queues: str, name: str) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "wb") as log:   # the worker writes to its own copy
            proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "worker", "--queues", queues, "--name", f"{name}-{self.tag}@%h",
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
def workers(service_env: dict[str, str], queues: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    w = Workers(service_env, tmp_path, queues["tag"])
    try:
        yield w
    finally:
        w.stop_all()


@pytest.fixture(scope="module")
def cpu_worker(service_env: dict[str, str], queues: dict[str, str], tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[subprocess.Popen]:
    """Validates uploads for the whole module (it does not take fine-tuning jobs)."""
    w = Workers(service_env, tmp_path_factory.mktemp("cpu-worker"), queues["tag"])
    proc = w.start(queues["cpu"], f"cpu-{secrets.token_hex(3)}")
    try:
        yield proc
    finally:
        w.stop_all()


# ------------------------------------------------------------------------------ the embedded default
# ------------------------------------------------------------------------------ a model
@pytest.fixture(scope="session")
def digits_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small-cnn trained normally on digits for a few epochs (seconds), as safetensors."""
    import torch

    from core.engine.data.datasets import load_dataset
    from core.engine.recipes.standard import train_standard
    from core.engine.zoo import create_model, save_model_file

    torch.manual_seed(0)
    data = load_dataset("digits", data_dir=tmp_path_factory.mktemp("datasets"))
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, dataset="digits")
    model = train_standard(model, data, epochs=3, seed=0)
    path = tmp_path_factory.mktemp("model") / "small-cnn-digits.safetensors"
    save_model_file(model, path)
    return path


@pytest.fixture(scope="session")
def fashion_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small-cnn trained normally on 1,000 Fashion-MNIST images (Debian's dataset-fashion-mnist) for
    two epochs (seconds; clean accuracy about 0.7), as safetensors."""
    import dataclasses

    import torch

    from core.engine.data.datasets import load_dataset
    from core.engine.recipes.standard import train_standard
    from core.engine.zoo import create_model, save_model_file

    torch.manual_seed(0)
    data = load_dataset("fashion-mnist", data_dir=tmp_path_factory.mktemp("datasets"))
    subset = dataclasses.replace(data, train_x=data.train_x[:1000], train_y=data.train_y[:1000])
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=28, dataset="fashion-mnist")
    model = train_standard(model, subset, epochs=2, seed=0)
    path = tmp_path_factory.mktemp("model") / "small-cnn-fashion.safetensors"
    save_model_file(model, path)
    return path


def upload_model(client: httpx.Client, path: Path, dataset: str = "digits") -> dict[str, Any]:
    size = {"digits": 8, "fashion-mnist": 28}[dataset]
    with open(path, "rb") as fh:
        r = client.post("/v1/models", files={"file": (path.name, fh, "application/octet-stream")},
                        data={"architecture": "small-cnn", "num_classes": "10", "dataset": dataset,
                              "input_shape": f"1,{size},{size}", "name": f"{dataset}-cnn"})
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


# ------------------------------------------------------------------------------ the fine-tuning flow
# The distributed and the embedded deployments run the same flow through these helpers.
def stream_events(url: str, headers: dict[str, str], job_id: str, sink: list[dict[str, Any]]) -> None:
    """Read the SSE stream until the server closes it (the job reached a final state)."""
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events",
                      headers={**headers, "Accept": "text/event-stream"}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                sink.append(json.loads(line[len("data: "):]))  # noqa: PERF401 - read live by another thread


def start_event_stream(url: str, headers: dict[str, str], job_id: str
                       ) -> tuple[threading.Thread, list[dict[str, Any]]]:
    streamed: list[dict[str, Any]] = []
    reader = threading.Thread(target=stream_events, args=(url, headers, job_id, streamed), daemon=True)
    reader.start()
    return reader, streamed


def w2_accuracy(path: Path) -> float:
    """W2 robust accuracy (W-PGD through the engine's evaluate) of a small-cnn weights file."""
    import tempfile

    from core.engine.config import EvaluateConfig
    from core.engine.data.datasets import load_dataset
    from core.engine.recipes.evaluate import evaluate
    from core.engine.zoo import load_model_file

    model = load_model_file(path, "small-cnn", num_classes=10, in_channels=1, image_size=8, dataset="digits")
    data = load_dataset("digits", data_dir=tempfile.gettempdir())
    cfg = EvaluateConfig(threat_model=THREAT, wpgd_steps=10, linf_attacks=["pgd"], pgd_steps=3)
    return float(evaluate(cfg, model, data, device="cpu").summary["w2_robust_accuracy"])


def poll_job(client: httpx.Client, job_id: str, timeout: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll the job until it ends; returns the final job and every job object seen on the way."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cur = client.get(f"/v1/jobs/{job_id}").json()
        seen.append(cur)
        if cur["status"] in ("succeeded", "failed", "cancelled"):
            return cur, seen
        time.sleep(0.15)
    raise AssertionError(f"job {job_id} did not end in {timeout:.0f} s: {json.dumps(seen[-1])[:2000]}")


def check_progress(seen: list[dict[str, Any]], final: dict[str, Any], epochs: int,
                   metrics_events: list[dict[str, Any]]) -> None:
    """The worker's progress (fraction, phase, epoch, ETA) and latest metrics, while running and at the end."""
    fractions = [j["progress"]["fraction"] for j in seen]
    assert len(set(fractions)) >= 3, fractions  # moved forward over the polls ...
    assert fractions == sorted(fractions), fractions  # ... never backwards
    running = [j for j in seen if j["status"] == "running" and (j["progress"]["epoch"] or 0) >= 1]
    assert running, "no poll saw the job running an epoch"
    # the recipes report step by step from the input model's validation on: once the share has moved,
    # every poll has an ETA (the demo used to show 0 % and no ETA through its first validation)
    moving = [j["progress"] for j in seen if j["status"] == "running" and (j["progress"]["fraction"] or 0) > 0]
    assert moving and all(isinstance(p["eta_seconds"], (int, float)) for p in moving), moving[:3]
    for j in running:
        p = j["progress"]
        assert p["phase"].split(":")[0] in ("train", "evaluate", "test"), p   # "test: <model>: <attack>" too
        assert 1 <= p["epoch"] <= p["total_epochs"] == epochs, p
        assert 0.0 < p["fraction"] <= 1.0, p
        # the ETA is estimated from the progress made since the job (or its resumption) began
        assert isinstance(p["eta_seconds"], (int, float)) and p["eta_seconds"] >= 0, p
        if p["phase"] == "train" and p["step"] is not None:
            assert 1 <= p["step"] <= p["total_steps"], p
    epochs_seen = [j["progress"]["epoch"] for j in running]
    assert epochs_seen == sorted(epochs_seen), epochs_seen
    # once an epoch was evaluated, its metrics are the job's latest metrics
    evaluated = [j for j in running if j["latest_metrics"]["w2_robust_accuracy"] is not None]
    assert evaluated, "no poll saw latest_metrics while the job ran"
    for j in evaluated:
        m = j["latest_metrics"]
        assert 0.0 <= m["w2_robust_accuracy"] <= 1.0 and 0.0 <= m["clean_accuracy"] <= 1.0, m
        # train_loss is None while only epoch 0 (the input model, never trained here) has been validated
        assert m["train_loss"] is None or isinstance(m["train_loss"], float), m
    # at the end: done, and the latest metrics are the last epoch's
    assert final["progress"]["phase"] == "done" and final["progress"]["fraction"] == 1.0, final["progress"]
    assert final["progress"]["eta_seconds"] == 0.0, final["progress"]
    assert final["progress"]["epoch"] == final["progress"]["total_epochs"] == epochs, final["progress"]
    last = metrics_events[-1]["data"]
    assert last["epoch"] == epochs
    assert final["latest_metrics"]["w2_robust_accuracy"] == pytest.approx(last["w2_robust_accuracy"])
    assert final["latest_metrics"]["clean_accuracy"] == pytest.approx(last["clean_accuracy"])
    assert isinstance(final["latest_metrics"]["train_loss"], float), final["latest_metrics"]


def run_finetune_flow(client: httpx.Client, url: str, model_id: str, upload: Path, tmp_path: Path,
                      epochs: int = 5, timeout: float = 150) -> dict[str, Any]:
    """Submit a fine-tuning job and follow it to success as a client would: SSE stream, polled progress,
    checkpoints, report, and the downloaded best checkpoint, which must load and be more W2-robust
    than `upload`. Returns the final job."""
    job = submit(client, model_id, epochs=epochs)
    job_id = job["id"]
    assert job["status"] == "queued"
    auth = {"Authorization": client.headers["authorization"]} if "authorization" in client.headers else {}
    reader, streamed = start_event_stream(url, auth, job_id)

    cur, seen = poll_job(client, job_id, timeout)
    assert cur["status"] == "succeeded", (cur, events(client, job_id))
    assert cur["attempt"] == 1

    # the SSE stream delivered the job's events in order and ended with the final status
    reader.join(timeout=30)
    assert not reader.is_alive(), "the event stream did not end after the job finished"
    ids = [e["id"] for e in streamed]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    assert [e["id"] for e in events(client, job_id)] == ids
    assert {"status", "checkpoint", "metrics", "progress"} <= {e["type"] for e in streamed}
    assert streamed[-1]["type"] == "status" and streamed[-1]["data"]["status"] == "succeeded"
    # the final status says the recipe's verdict in its words, decided by the paired interval
    assert streamed[-1]["data"]["verdict"] == cur["result"]["verdict"]
    assert cur["result"]["verdict_text"] in streamed[-1]["message"]
    assert [e["data"]["epoch"] for e in streamed if e["type"] == "checkpoint"] == list(range(1, epochs + 1))
    metrics_events = [e for e in streamed if e["type"] == "metrics"]
    # epoch 0 (the input model's validation metrics) first, then one per trained epoch
    assert [e["data"]["epoch"] for e in metrics_events] == list(range(0, epochs + 1))

    check_progress(seen, cur, epochs, metrics_events)

    # the result summary, the best checkpoint and its integrity
    result = cur["result"]
    assert set(result) >= {"best_checkpoint_id", "best_epoch", "before", "after", "improved", "provenance"}
    assert result["improved"] is True and result["best_epoch"] >= 1, result.get("verdict_text")
    ckpts = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["epoch"] for c in ckpts] == list(range(1, epochs + 1))
    best = [c for c in ckpts if c["is_best"]]
    assert [c["id"] for c in best] == [result["best_checkpoint_id"]]
    r = client.get(f"/v1/jobs/{job_id}/checkpoint")
    assert r.status_code == 200
    digest = hashlib.sha256(r.content).hexdigest()
    assert r.headers["etag"] == f'"{digest}"' == f'"{best[0]["sha256"]}"'
    path = tmp_path / "best.safetensors"
    path.write_bytes(r.content)
    report = client.get(f"/v1/jobs/{job_id}/report")
    assert report.status_code == 200 and report.json()["best_epoch"] == result["best_epoch"]
    plot = client.get(f"/v1/jobs/{job_id}/report.png")
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")

    # the downloaded checkpoint loads and is more robust than the upload (independent evaluation)
    before, after = w2_accuracy(upload), w2_accuracy(path)
    assert after > before, (before, after)
    return cur


# ------------------------------------------------------------------------------ the embedded default
def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        children = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True).stdout.split()
        out += [int(c) for c in children]
        todo += [int(c) for c in children]
    return out


class EmbeddedServe:
    """`robustify serve` with nothing configured but a data folder (SQLite, kombu's SQLAlchemy broker,
    artifacts on disk, auth off on localhost), ready on entry; stopped with SIGTERM on exit, after
    which `rc` and `worker_pids` tell how it stopped."""

    def __init__(self, tmp_path: Path, env: dict[str, str] | None = None, ready_timeout: float = 60, *,
                 args: tuple[str, ...] = (), port: int | None = None, data_dir: Path | None = None,
                 log_path: Path | None = None) -> None:
        self.data_dir = data_dir or tmp_path / "robustify-data"
        self.log_path = log_path or tmp_path / "serve.log"
        self.url = f"http://127.0.0.1:{port or free_port()}"
        self.args = args
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTIFY_")}
        self.env.update({"ROBUSTIFY_DATA_DIR": str(self.data_dir), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                         **(env or {})})
        self.cwd, self.ready_timeout = tmp_path, ready_timeout
        self.rc: int | None = None
        self.worker_pids: list[int] = []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> EmbeddedServe:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", self.url.rsplit(":", 1)[1],
                                          *self.args], env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

        # readyz: API, database, broker and worker; an API without a worker can only be live
        probe = "healthz" if "--no-worker" in self.args else "readyz"

        def up() -> bool:
            assert self.proc.poll() is None, self.log()[-3000:]
            try:
                return httpx.get(f"{self.url}/{probe}", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(up, self.ready_timeout, "robustify serve to be ready")
        except BaseException:
            kill_group(self.proc)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.worker_pids = _descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise

    def workers_gone(self) -> bool:
        return not any(_process_alive(p) for p in self.worker_pids)
