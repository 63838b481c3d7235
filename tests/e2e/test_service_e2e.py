"""The distributed deployment end to end: uvicorn + Celery workers + PostgreSQL + Redis.

Each test drives the HTTP API only, as a client would; workers are real processes.
"""
from __future__ import annotations

import hashlib
import os
import signal
import time
from typing import Any

import httpx
import pytest

from cli.main import main
from tests.e2e.conftest import LIFECYCLE, THREAT, events, run_finetune_flow, submit, wait_status, wait_until

pytestmark = [pytest.mark.service, pytest.mark.timeout(240)]


def test_finetune_job_runs_to_success(client: httpx.Client, api_url: str, ready_model: dict[str, Any],
                                      workers: Any, queues: dict[str, str], digits_model_file: Any,
                                      tmp_path: Any) -> None:
    workers.start(queues["gpu"], "gpu-a")
    run_finetune_flow(client, api_url, ready_model["id"], digits_model_file, tmp_path, epochs=5)


def test_queued_job_cancels_at_once(client: httpx.Client, ready_model: dict[str, Any]) -> None:
    # no worker consumes the gpu queue in this test: the job stays queued
    job = submit(client, ready_model["id"])
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_running_job_cancels_and_keeps_its_checkpoint(client: httpx.Client, ready_model: dict[str, Any],
                                                      workers: Any, queues: dict[str, str], api_url: str,
                                                      api_key: str, capsys: pytest.CaptureFixture[str]) -> None:
    workers.start(queues["gpu"], "gpu-cancel")
    job_id = submit(client, ready_model["id"], epochs=40, attack_steps=5)["id"]
    wait_until(lambda: any(e["type"] == "checkpoint" for e in events(client, job_id)), 120,
               "the first checkpoint")
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    t0 = time.monotonic()
    job = wait_status(client, job_id, {"cancelled", "succeeded", "failed"}, 20)
    assert job["status"] == "cancelled", job
    assert time.monotonic() - t0 < 10
    ckpts = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert ckpts and ckpts[-1]["epoch"] < 40
    r = client.get(f"/v1/jobs/{job_id}/checkpoints/{ckpts[-1]['id']}/content")
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == ckpts[-1]["sha256"]
    # the CLI tells what ran: the epochs completed of the 40 configured, never "trained 40 epochs"
    done = job["result"]["epochs_completed"]
    capsys.readouterr()
    assert main(["jobs", "get", job_id, "--url", api_url, "--key", api_key]) == 0
    out = capsys.readouterr().out
    assert f"STOPPED after epoch {done}" in out and f"trained {done} of 40 epochs" in out, out
    assert "trained 40 epochs" not in out


def test_killed_worker_job_resumes_on_another_worker(client: httpx.Client, ready_model: dict[str, Any],
                                                     workers: Any, queues: dict[str, str]) -> None:
    first = workers.start(queues["gpu"], "gpu-doomed")
    epochs = 12
    job_id = submit(client, ready_model["id"], epochs=epochs, attack_steps=5, **LIFECYCLE)["id"]
    wait_until(lambda: any(e["type"] == "checkpoint" for e in events(client, job_id)), 120,
               "the first checkpoint")
    running = client.get(f"/v1/jobs/{job_id}").json()
    assert running["status"] == "running" and running["attempt"] == 1
    os.killpg(first.pid, signal.SIGKILL)  # the whole worker: parent and the child running the job
    first.wait(timeout=10)
    killed_at = time.time()
    done_before = max(e["data"]["epoch"] for e in events(client, job_id) if e["type"] == "checkpoint")
    assert done_before < epochs

    workers.start(queues["gpu"], "gpu-rescue")
    job = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 150)
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 2

    evs = events(client, job_id)
    starts = [e for e in evs if e["type"] == "status" and e["data"].get("status") == "running"]
    assert [e["data"]["attempt"] for e in starts] == [1, 2]
    assert starts[0]["data"]["worker_id"] != starts[1]["data"]["worker_id"]
    resumed = [e for e in evs if "resumed_from_epoch" in (e["data"] or {})]
    assert len(resumed) == 1 and resumed[0]["data"]["resumed_from_epoch"] >= 1
    # no epoch was trained twice from scratch: one checkpoint per epoch, epochs in order
    ckpt_epochs = [e["data"]["epoch"] for e in evs if e["type"] == "checkpoint"]
    assert ckpt_epochs == list(range(1, epochs + 1)), ckpt_epochs
    # the second attempt began after the first worker was dead: the two never overlapped
    second_start = starts[1]["created_at"]
    from datetime import datetime

    assert datetime.fromisoformat(second_start.replace("Z", "+00:00")).timestamp() >= killed_at - 0.5
    first_attempt_events = [e for e in evs if e["id"] < starts[1]["id"]]
    assert all(datetime.fromisoformat(e["created_at"].replace("Z", "+00:00")).timestamp() <= killed_at + 0.5
               for e in first_attempt_events)


def test_rejected_upload_keeps_nothing(client: httpx.Client, cpu_worker: Any, service_env: dict[str, str],
                                       tmp_path: Any) -> None:
    import torch

    from core.engine.zoo import create_model, save_model_file

    torch.manual_seed(123)
    path = tmp_path / "ten-classes.safetensors"
    save_model_file(create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, dataset="digits"), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, "rb") as fh:  # the file has a 10-class head; the form claims 7 classes
        r = client.post("/v1/models", files={"file": (path.name, fh, "application/octet-stream")},
                        data={"architecture": "small-cnn", "num_classes": "7", "dataset": "digits",
                              "input_shape": "1,8,8"})
    assert r.status_code == 201, r.text
    model_id = r.json()["id"]
    store = __import__("pathlib").Path(service_env["ROBUSTIFY_DATA_DIR"]) / "artifacts"
    assert any(p.name == digest for p in store.rglob("*"))

    m = wait_until(lambda: (lambda m: m if m["status"] != "validating" else None)(
        client.get(f"/v1/models/{model_id}").json()), 60, "the validation")
    assert m["status"] == "rejected"
    assert m["error"]["code"] == "invalid_model_file"
    # the reason names the mismatching key and shapes, and the user's file rather than the store's path
    message = m["error"]["message"]
    assert "classifier" in message and "shape" in message and "[7" in message and "[10" in message, message
    assert path.name in message and digest not in message and digest[:6] not in message, message
    assert client.get(f"/v1/models/{model_id}/content").status_code == 404
    assert not any(p.name == digest for p in store.rglob("*")), "the rejected upload's file was kept"
    r = client.post("/v1/jobs", json={"type": "finetune", "model_id": model_id, "dataset": "digits"})
    assert r.status_code == 409 and r.json()["code"] == "model_not_ready"


def test_evaluate_job_writes_a_report(client: httpx.Client, ready_model: dict[str, Any], workers: Any,
                                      queues: dict[str, str]) -> None:
    workers.start(queues["gpu"], "gpu-eval")
    r = client.post("/v1/jobs", json={"type": "evaluate", "model_id": ready_model["id"], "dataset": "digits",
                                      "threat_model": THREAT,
                                      "config": {"n_examples": 120, "wpgd_steps": 5, "pgd_steps": 3,
                                                 "batch_size": 128, "deltas": [0.05, 0.1],
                                                 "corruptions": {"types": ["gaussian_noise", "motion_blur"],
                                                                 "severities": [1, 5]}}})
    assert r.status_code == 202, r.text
    assert r.json()["config"]["corruptions"]["types"] == ["gaussian_noise", "motion_blur"]
    job = wait_status(client, r.json()["id"], {"succeeded", "failed", "cancelled"}, 120)
    assert job["status"] == "succeeded", job
    summary = job["result"]["summary"]
    assert 0.0 <= summary["w2_robust_accuracy"] <= summary["clean_accuracy"] <= 1.0
    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["summary"] == summary
    # the common corruptions: gaussian noise measured, motion blur's kernel longer than 8 px skipped, said why
    corruptions = report["corruptions"]
    assert [(c["type"], c["severity"]) for c in corruptions["rows"]] == [("gaussian_noise", 1), ("gaussian_noise", 5)]
    assert {(c["type"], c["severity"]) for c in corruptions["skipped"]} == {("motion_blur", 1), ("motion_blur", 5)}
    assert all("longer than the 8×8 image" in c["reason"] for c in corruptions["skipped"])
    assert summary["mean_corruption_accuracy"] == corruptions["mean_accuracy"]
    assert any(e["type"] == "warning" and "motion_blur" in e["message"] for e in events(client, job["id"]))
    bad = client.post("/v1/jobs", json={"type": "evaluate", "model_id": ready_model["id"], "dataset": "digits",
                                        "config": {"corruptions": ["gausian_noise"]}})
    assert bad.status_code == 422 and "did you mean 'gaussian_noise'" in bad.text, bad.text
    assert client.get(f"/v1/jobs/{job['id']}/report.png").content.startswith(b"\x89PNG")
    assert client.get(f"/v1/jobs/{job['id']}/checkpoint").status_code == 404  # evaluation trains nothing


def test_killed_pool_child_requeues_at_once(client: httpx.Client, ready_model: dict[str, Any], workers: Any,
                                            queues: dict[str, str]) -> None:
    """SIGKILL only the prefork child running the job: the same worker's new child resumes it at once
    (reject_on_worker_lost requeues the message; the claim sees the owner process is dead, so
    neither waits for the stale-heartbeat threshold)."""
    proc = workers.start(queues["gpu"], "gpu-child")
    epochs = 10
    job_id = submit(client, ready_model["id"], epochs=epochs, attack_steps=5, **LIFECYCLE)["id"]
    wait_until(lambda: any(e["type"] == "checkpoint" for e in events(client, job_id)), 120, "the first checkpoint")
    owner = client.get(f"/v1/jobs/{job_id}").json()
    assert owner["status"] == "running"
    starts = [e for e in events(client, job_id) if e["type"] == "status" and e["data"].get("status") == "running"]
    child_pid = int(starts[-1]["data"]["worker_id"].rsplit(":", 1)[1])
    assert child_pid != proc.pid
    os.kill(child_pid, signal.SIGKILL)
    killed = time.monotonic()

    def restarted() -> bool:
        return client.get(f"/v1/jobs/{job_id}").json()["attempt"] == 2

    # the new pool child claims it (a fresh process imports torch first: on a loaded 2-core machine that
    # alone took over 30 s once)
    wait_until(restarted, 60, "the job to be restarted")
    job = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 120)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    assert proc.poll() is None, "the worker's parent process survived the child's death"
    assert "WorkerLostError" in workers.log(proc)
    evs = events(client, job_id)
    assert [e["data"]["epoch"] for e in evs if e["type"] == "checkpoint"] == list(range(1, epochs + 1))
    assert any("resumed_from_epoch" in (e["data"] or {}) for e in evs)
    assert time.monotonic() - killed < 150


# A fine-tune of a few seconds: the quick preset on 100 test images.
FAST = {"epochs": 2, "evaluation": "quick", "test_examples": 100}


def _seconds(job: dict[str, Any]) -> float:
    from datetime import datetime
    start, end = (datetime.fromisoformat(job[k].replace("Z", "+00:00")) for k in ("started_at", "finished_at"))
    return (end - start).total_seconds()


def test_submit_answers_with_an_estimate_from_the_workers_calibration(
        client: httpx.Client, ready_model: dict[str, Any], workers: Any, queues: dict[str, str],
        service_env: dict[str, str]) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from core.service.db import WorkerHeartbeat, heartbeat_calibration

    workers.start(queues["gpu"], "gpu-estimate")
    engine = create_engine(service_env["ROBUSTIFY_DATABASE_URL"])
    try:
        def calibrated() -> dict[str, Any] | None:     # the worker times the reference when it starts
            with Session(engine) as s:
                rows = [r for r in s.query(WorkerHeartbeat).all() if r.id.startswith("gpu-estimate-")]
                return heartbeat_calibration(rows[0]) if rows else None
        cal = wait_until(calibrated, 120, "the worker's calibration")
        assert cal["device_class"] == "cpu" and cal["reference"]["seconds_per_unit"] > 0

        first = submit(client, ready_model["id"], **FAST)
        estimate = first["estimate"]
        assert estimate["reason"] is None and estimate["kind"] == "small-cnn@1x8x8", estimate
        assert estimate["devices"]["cpu"]["workers_seen"] >= 1 and estimate["devices"]["cpu"]["seconds"] > 0
        assert client.get(f"/v1/jobs/{first['id']}").json()["estimate"] == estimate   # kept with the job
        first_done = wait_status(client, first["id"], {"succeeded", "failed"}, timeout=180)
        assert first_done["status"] == "succeeded", first_done["error"]

        # the finished job records its kind's cost on the worker (just after its status is written)
        wait_until(lambda: "small-cnn@1x8x8" in (calibrated() or {}).get("kinds", {}), 30, "the job's kind")
        # the next job's estimate is measured; a process's first job ran cold (the engine imported, digits
        # read), so the third job's estimate, from the second's warm timing, is the one to hold to a factor 3
        ratios = []
        for recorded in (2, 3):
            second = submit(client, ready_model["id"], **FAST)
            cpu = second["estimate"]["devices"]["cpu"]
            assert cpu["basis"] == "measured", second["estimate"]
            done = wait_status(client, second["id"], {"succeeded", "failed"}, timeout=180)
            assert done["status"] == "succeeded", done["error"]
            ratios.append(cpu["seconds"] / _seconds(done))
            wait_until(lambda n=recorded: (calibrated() or {}).get("kinds", {})["small-cnn@1x8x8"]["jobs"] == n, 30,
                       "the job's timing")
        print(f"estimate / run time: reference {estimate['devices']['cpu']['seconds'] / _seconds(first_done):.2f}, "
              f"measured cold {ratios[0]:.2f}, warm {ratios[1]:.2f}")
        assert 1 / 3 <= ratios[1] <= 3, (ratios, cpu, _seconds(done), estimate["devices"]["cpu"], _seconds(first_done))

        # more epochs: a longer estimate (cancelled before it runs long)
        longer = submit(client, ready_model["id"], **{**FAST, "epochs": 6})
        client.post(f"/v1/jobs/{longer['id']}/cancel")
        assert longer["estimate"]["devices"]["cpu"]["seconds"] > cpu["seconds"]
        assert longer["estimate"]["passes"]["cpu"]["training"] == 3 * second["estimate"]["passes"]["cpu"]["training"]
        wait_status(client, longer["id"], {"cancelled", "succeeded", "failed"}, timeout=120)
    finally:
        engine.dispose()
