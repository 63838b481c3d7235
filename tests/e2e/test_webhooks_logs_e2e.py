"""The SDK, webhooks and JSON logs with the real pieces: uvicorn and a Celery worker on PostgreSQL
and Redis, a receiver HTTP server, and a fine-tune driven through `robustify.Client`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import robustify
from robustify.webhooks import verify
from tests.e2e.conftest import THREAT, TINY, wait_until
from tests.webhook_receiver import Receiver

pytestmark = [pytest.mark.service, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def service_env(service_env: dict[str, str]) -> dict[str, str]:
    return {**service_env, "ROBUSTIFY_LOG_FORMAT": "json", "ROBUSTIFY_WEBHOOK_ALLOW_PRIVATE": "1",
            "ROBUSTIFY_WEBHOOK_RETRY_BASE_SECONDS": "0.2", "ROBUSTIFY_WEBHOOK_POLL_SECONDS": "0.2"}


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_sdk_finetune_with_signed_webhooks_and_json_logs(api_url: str, api_key: str, workers: Any,
                                                         queues: dict[str, str], digits_model_file: Path,
                                                         tmp_path: Path, tmp_path_factory: Any) -> None:
    proc = workers.start(f"{queues['gpu']},{queues['cpu']}", "hooks")
    with Receiver(answers=[500]) as receiver, robustify.Client(api_url, api_key=api_key) as sdk:
        endpoint = sdk.webhooks.create(receiver.url, description="e2e")
        uploaded = sdk.models.upload(digits_model_file, architecture="small-cnn", num_classes=10, dataset="digits",
                                     input_shape=[1, 8, 8])
        model = sdk.models.wait(uploaded.id, timeout=120, poll_interval=0.3)
        assert model.status == "ready", model.error
        job = sdk.jobs.create(type="finetune", model_id=model.id, dataset="digits", threat_model=THREAT,
                              config={**TINY, "epochs": 2}, webhook=receiver.url)
        assert job.webhook == {"endpoint_id": endpoint.id, "events": None}
        job = sdk.jobs.wait(job.id, timeout=180, poll_interval=0.3)
        assert job.succeeded, job.error
        files = sdk.jobs.download(job.id, tmp_path / "dl")  # sha256-verified
        best = [c for c in sdk.jobs.checkpoints(job.id) if c.is_best]
        assert files.checkpoint is not None and best and files.checkpoint.stat().st_size == best[0].size

        deliveries = wait_until(lambda: (d := sdk.jobs.webhook_deliveries(job.id)) and
                                all(x.status != "pending" for x in d) and d, 30, "the webhooks to be delivered")
    assert [d.event_type for d in deliveries] == ["job.started", "job.progress", "job.progress", "job.succeeded"]
    assert all(d.status == "succeeded" for d in deliveries)
    assert [a.status_code for a in deliveries[0].attempts] == [500, 204]  # the receiver's first answer

    # what the receiver got: authentic, one message per event (plus the retry), in the job's words
    bodies = {}
    for got in receiver.received:
        if got["answered"] == 204:
            bodies[got["headers"]["webhook-id"]] = verify(endpoint.secret, got["headers"], got["body"])
    assert set(bodies) == {d.id for d in deliveries}
    progress = [bodies[d.id]["data"] for d in deliveries if d.event_type == "job.progress"]
    assert [(p["epoch"], p["total_epochs"]) for p in progress] == [(1, 2), (2, 2)]
    assert all(0.0 <= p["metrics"]["w2_robust_accuracy"] <= 1.0 for p in progress)
    done = bodies[deliveries[-1].id]["data"]
    assert done["status"] == "succeeded" and done["result"]["best_checkpoint_id"] == best[0].id

    # worker: JSON lines; the job's lifecycle lines carry the job id, the attempt and the worker
    worker_lines = _json_lines(workers.log(proc))
    mine = [line for line in worker_lines if line.get("job_id") == job.id]
    messages = [line["message"] for line in mine]
    assert any("claimed by" in m for m in messages) and f"job {job.id} succeeded" in messages
    assert sum(m.startswith("epoch ") and " done: " in m for m in messages) == 2
    assert {(line["attempt"], line["component"]) for line in mine} == {(1, "worker")}
    (owner,) = {line["worker_id"] for line in mine}
    assert owner.rpartition(":")[2].isdigit()  # host:pid of the process that ran the job
    assert all(line.get("job_id") == job.id for line in worker_lines if job.id in line["message"]
               and line["logger"] == "robustify.worker")

    # API: JSON lines, access lines as fields
    api_logs = {p.resolve() for p in Path(tmp_path_factory.getbasetemp()).glob("logs*/api.log")
                if job.id in p.read_text()}
    assert len(api_logs) == 1
    api_lines = _json_lines(api_logs.pop().read_text())
    assert api_lines and all(line["component"] == "api" for line in api_lines)
    assert any(line.get("method") == "POST" and line.get("path") == "/v1/jobs" and line.get("status") == 202
               for line in api_lines)

