"""The embedded default end to end: `robustify serve` with nothing configured but a data folder
(SQLite database, kombu's SQLAlchemy broker on SQLite, artifacts on disk, auth off on localhost)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import (
    LIFECYCLE,
    EmbeddedServe,
    _descendants,
    _process_alive,
    events,
    free_port,
    run_finetune_flow,
    submit,
    upload_model,
    wait_model_ready,
    wait_status,
    wait_until,
)

pytestmark = pytest.mark.timeout(240)


def test_serve_runs_a_job_on_the_embedded_default(tmp_path: Path, digits_model_file: Path) -> None:
    with EmbeddedServe(tmp_path, {"ROBUSTIFY_PROGRESS_INTERVAL_SECONDS": "0.3"}) as serve:
        assert f"robustify serving on {serve.url}" in serve.log()
        with httpx.Client(base_url=serve.url, timeout=30) as client:  # no API key: auth is off on localhost
            model = wait_model_ready(client, upload_model(client, digits_model_file)["id"])
            # the same flow as the distributed deployment's: SSE, progress, checkpoints, a more robust model
            run_finetune_flow(client, serve.url, model["id"], digits_model_file, tmp_path, epochs=5)
        assert (serve.data_dir / "robustify.db").is_file() and (serve.data_dir / "broker.db").is_file()
        assert any((serve.data_dir / "artifacts").rglob("*"))
        # the worker's job lifecycle shows by default; the access log and Celery's chatter do not
        log = serve.log()
        assert "claimed by" in log and "epoch 5/5 done: clean_accuracy" in log and " succeeded" in log
        assert "robustify.worker [job_" in log  # text lines name the job, attempt and worker
        assert '"GET /v1/jobs/' not in log and "Task robustify.run_job" not in log
    # a clean stop: exit code 0 and the worker processes gone with it
    assert serve.rc == 0, serve.log()[-3000:]
    assert "robustify stopped." in serve.log()
    assert serve.worker_pids, "serve started no worker process"
    wait_until(serve.workers_gone, 10, "the worker processes to exit")


def test_serve_stopped_mid_job_hands_it_back_and_a_restart_finishes_it(tmp_path: Path,
                                                                      digits_model_file: Path) -> None:
    """SIGTERM to `serve` while a job trains: the API and the worker stop side by side, the epoch
    under way is checkpointed and the job handed back before serve exits (nothing is killed); the
    next `serve` on the same data folder resumes it to the end."""
    epochs, env = 3, {"ROBUSTIFY_PROGRESS_INTERVAL_SECONDS": "0.3"}
    with EmbeddedServe(tmp_path, env) as serve, httpx.Client(base_url=serve.url, timeout=30) as client:
        model = wait_model_ready(client, upload_model(client, digits_model_file)["id"])
        job_id = submit(client, model["id"], epochs=epochs, **LIFECYCLE)["id"]

        def inside_epoch_two() -> bool:
            p = client.get(f"/v1/jobs/{job_id}").json()["progress"]
            return p["phase"] == "train" and (p["epoch"] or 0) >= 2

        wait_until(inside_epoch_two, 120, "training inside epoch 2", interval=0.1)
        signalled = time.monotonic()
    took = time.monotonic() - signalled
    log = serve.log()
    assert serve.rc == 0 and "robustify stopped." in log, log[-3000:]
    assert "did not stop within" not in log and f"job {job_id} handed back to the queue" in log, log[-3000:]
    wait_until(serve.workers_gone, 10, "the worker processes to exit")
    print(f"serve stopped {took:.1f} s after SIGTERM, its running job handed back")

    with EmbeddedServe(tmp_path, env) as again, httpx.Client(base_url=again.url, timeout=30) as client:
        done = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 150)
        evs = events(client, job_id)
    assert done["status"] == "succeeded" and done["attempt"] == 1, done   # the hand-back gave its attempt back
    back = [e for e in evs if e["type"] == "status" and e["data"].get("reason") == "handed_back"]
    partial = [e for e in evs if e["type"] == "checkpoint" and e["data"]["partial"]]
    assert len(back) == 1 and partial and partial[-1]["id"] < back[0]["id"]   # the stopped epoch was saved first
    assert [e["data"]["epoch"] for e in evs if e["type"] == "checkpoint" and not e["data"]["partial"]] == \
        list(range(1, epochs + 1))   # each epoch once: nothing lost, nothing twice
    assert any("resumed_from_epoch" in (e["data"] or {}) for e in evs)


def test_a_registration_during_a_fine_tune_is_checked_and_ready_within_10_s(tmp_path: Path,
                                                                          digits_model_file: Path) -> None:
    """`serve` validates models in a worker of their own (the cpu queue), so a registration made while a
    fine-tune runs does not wait for it. The check measures each model's clean accuracy on a sample of
    digits; the same weights registered with a wrong mean/std are ready too, with a warning naming the
    normalisation."""
    with EmbeddedServe(tmp_path, {"ROBUSTIFY_PROGRESS_INTERVAL_SECONDS": "0.3"}) as serve, \
            httpx.Client(base_url=serve.url, timeout=30) as client:
        model = wait_model_ready(client, upload_model(client, digits_model_file)["id"])
        check = model["sanity_check"]
        assert check["status"] == "passed" and check["accuracy"] > 0.8, check
        assert check["n"] == 256 and check["ci95"][0] < check["accuracy"] < check["ci95"][1]
        assert check["message"].startswith("Clean accuracy") and check["dataset"] == "digits"
        job_id = submit(client, model["id"], epochs=40)["id"]

        def running() -> bool:   # the job worker is busy with it (from its epoch-0 validation on)
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] in ("queued", "running"), job
            return job["status"] == "running"

        wait_until(running, 120, "the fine-tune to run", interval=0.1)
        started = time.monotonic()
        with open(digits_model_file, "rb") as fh:
            r = client.post("/v1/models", files={"file": ("wrong.safetensors", fh, "application/octet-stream")},
                            data={"architecture": "small-cnn", "num_classes": "10", "dataset": "digits",
                                  "input_size": "1,8,8", "input_mean": "0.5", "input_std": "0.05"})
        assert r.status_code == 201, r.text
        wrong = wait_model_ready(client, r.json()["id"], timeout=10)
        took = time.monotonic() - started
        # the job still runs: the validation did not wait for it
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        warned = wrong["sanity_check"]
        assert warned["status"] == "warning" and warned["likely_cause"] == "normalisation", warned
        assert warned["accuracy"] < check["accuracy"]
        assert "the registered normalisation (input_mean / input_std) is probably wrong" in warned["message"]
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)   # stops at its next check
    print(f"a registration during a fine-tune was ready in {took:.1f} s")
    assert serve.rc == 0, serve.log()[-3000:]


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """`robustify demo` (the README's first command), shortened to 2 epochs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTIFY_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    data_dir = tmp_path / "demo-data"
    proc = subprocess.run([sys.executable, "-m", "cli", "demo", "--data-dir", str(data_dir), "--port",
                           str(free_port()), "--epochs", "2"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=170)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    # stdout is not a terminal: the job's progress in lines (a line per phase, epoch or status change),
    # with the epoch and the percentage, not a bar frame every half second
    assert "\r" not in out and len(out.splitlines()) < 200, out[-3000:]
    assert re.search(r"\d\d:\d\d:\d\d  running\s+\d+%  epoch [12]/2  ", out), out[-3000:]
    for step in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert step in out
    assert "verified" in out and "W2 robust accuracy" in out and "robustify serve" in out
    weights = data_dir / "demo" / "robust-small-cnn-digits.safetensors"
    from core.engine.zoo import load_model_file

    load_model_file(weights, "small-cnn", num_classes=10, in_channels=1, image_size=8, dataset="digits")


def test_serve_killed_takes_its_worker_with_it(tmp_path: Path) -> None:
    """`robustify serve` SIGKILLed cannot stop its worker itself: the worker notices that its parent
    is gone and stops (warm, so a running job would be handed back), leaving no orphan."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTIFY_")}
    env.update({"ROBUSTIFY_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        serve = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port)], env=env, cwd=tmp_path,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> bool:
            assert serve.poll() is None, log_path.read_text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200  # the worker beats
            except httpx.HTTPError:
                return False

        wait_until(ready, 60, "robustify serve and its worker")
        workers = _descendants(serve.pid)
        assert workers, "serve started no worker process"
        serve.send_signal(signal.SIGKILL)
        serve.wait(timeout=10)
        wait_until(lambda: not any(_process_alive(p) for p in workers), 20, "the orphaned worker processes to exit")
    finally:
        with contextlib.suppress(ProcessLookupError):   # whatever is left of the group, if the test failed
            os.killpg(serve.pid, signal.SIGKILL)
