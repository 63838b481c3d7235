"""/v1/jobs against PostgreSQL and Redis: submit, validation, idempotency, pagination, cancel,
events (JSON and Server-Sent Events), checkpoint and report downloads."""
from __future__ import annotations

import hashlib
import json
import threading
import time

import httpx
import pytest

from core.service.db import Job, JobEvent, utcnow
from core.storage.artifacts import ArtifactStore, record_artifact
from tests.service.conftest import LiveServer
from tests.service.test_models_api import assert_problem


@pytest.fixture(scope="module")
def ready_model(db, keys) -> str:
    return db.add_model(keys["a"]["id"], status="ready")


def submit(client, headers, model_id, **over):
    body = {"type": "finetune", "model_id": model_id, "dataset": "digits",
            "threat_model": {"kind": "w2-linf", "delta": 0.05}, "config": {"epochs": 2}, "seed": 7, **over}
    return client.post("/v1/jobs", headers=headers, json=body)


def test_submit_writes_row_event_and_message(client, keys, ready_model, queues, db):
    before = queues.length(queues.gpu)
    resp = submit(client, keys["a"]["headers"], ready_model, metadata={"run": 1})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["object"] == "job" and job["status"] == "queued" and job["attempt"] == 0
    # Defaults filled in; the top-level threat model and seed merged into the config.
    assert job["config"]["epochs"] == 2 and job["config"]["beta"] == 6.0 and job["config"]["seed"] == 7
    assert job["config"]["threat_model"] == {"kind": "w2-linf", "delta": 0.05} == job["threat_model"]
    assert job["progress"]["fraction"] == 0.0 and set(job["latest_metrics"]) >= {"clean_accuracy", "w2_robust_accuracy"}
    assert job["urls"]["checkpoint"] == f"/v1/jobs/{job['id']}/checkpoint"
    assert job["max_attempts"] == 3
    assert queues.length(queues.gpu) == before + 1
    msg = queues.messages(queues.gpu)[0]
    assert msg["headers"]["task"] == "robustify.run_job" and job["id"] in msg["headers"]["argsrepr"]
    assert db.count(JobEvent, JobEvent.job_id == job["id"], JobEvent.type == "status") == 1
    got = client.get(f"/v1/jobs/{job['id']}", headers=keys["a"]["headers"]).json()
    assert got["config"] == job["config"] and got["metadata"] == {"run": 1}


def test_evaluate_defaults(client, keys, ready_model):
    resp = submit(client, keys["a"]["headers"], ready_model, type="evaluate", config={}, threat_model=None, seed=None)
    assert resp.status_code == 202, resp.text
    cfg = resp.json()["config"]
    assert cfg["wpgd_steps"] == 50 and cfg["threat_model"]["kind"] == "w2-linf"
    assert abs(cfg["threat_model"]["delta"] - 8 / 255) < 1e-9


@pytest.mark.parametrize("over, field", [
    ({"config": {"epochs": 0}}, "config.epochs"),
    ({"config": {"learning_rate": 0.1}}, "config.learning_rate"),
    ({"threat_model": {"kind": "w3", "delta": 0.1}}, "threat_model.kind"),
    ({"config": {"lr": -1}}, "config.lr"),
    ({"type": "train"}, "type"),
    ({"config": {"attack_overshoot": 1e308}}, "config.attack_overshoot"),
    ({"config": {"attack_schedule": "allocate", "attack_loss": "kl"}}, "config"),
    ({"config": {"attack_schedule": "allocate"}, "threat_model": {"kind": "linf", "delta": 0.03}}, "config"),
])
def test_bad_config_is_422_naming_the_field(client, keys, ready_model, db, queues, over, field):
    jobs, queued = db.count(Job), queues.length(queues.gpu)
    body = assert_problem(submit(client, keys["a"]["headers"], ready_model, **over), 422, "validation_error")
    assert field in [e["field"] for e in body["errors"]], body
    assert field in body["detail"]
    assert db.count(Job) == jobs and queues.length(queues.gpu) == queued


def test_model_not_ready_unknown_and_other_keys(client, keys, db, queues):
    jobs, queued = db.count(Job), queues.length(queues.gpu)
    validating = db.add_model(keys["a"]["id"], status="validating")
    body = assert_problem(submit(client, keys["a"]["headers"], validating), 409, "model_not_ready")
    assert body["model_status"] == "validating" and validating in body["detail"]
    assert_problem(submit(client, keys["a"]["headers"], "mdl_unknown"), 404, "not_found")
    others = db.add_model(keys["b"]["id"], status="ready")
    assert_problem(submit(client, keys["a"]["headers"], others), 404, "not_found")
    assert_problem(submit(client, keys["b"]["headers"], others, dataset="ds_not_there"), 404, "not_found")
    assert_problem(submit(client, keys["b"]["headers"], others, dataset="mnist-ish"), 422, "dataset_unavailable")
    assert_problem(submit(client, keys["b"]["headers"], others, model={"robustbench": {"name": "X"}}), 422,
                   "validation_error")  # both model_id and model
    assert db.count(Job) == jobs and queues.length(queues.gpu) == queued
    assert_problem(client.get("/v1/jobs/job_unknown", headers=keys["a"]["headers"]), 404, "not_found")


def test_inline_robustbench_reference_registers_then_waits(client, keys, queues, db):
    ref = {"robustbench": {"name": "Carmon2019Unlabeled", "dataset": "cifar10", "threat_model": "Linf"}}
    cpu = queues.length(queues.cpu)
    body = assert_problem(submit(client, keys["b"]["headers"], None, model=ref, dataset="cifar10"),
                          409, "model_not_ready")
    assert queues.length(queues.cpu) == cpu + 1  # validation queued once
    from core.service.db import Model
    db.update(Model, body["model_id"], status="ready")
    resp = submit(client, keys["b"]["headers"], None, model=ref, dataset="cifar10")
    assert resp.status_code == 202 and resp.json()["model_id"] == body["model_id"]


def test_idempotency_key(client, keys, ready_model, queues, db):
    h = {**keys["a"]["headers"], "Idempotency-Key": "abc-123"}
    queued = queues.length(queues.gpu)
    first = submit(client, h, ready_model)
    second = submit(client, h, ready_model)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["idempotent-replayed"] == "true"
    assert queues.length(queues.gpu) == queued + 1  # enqueued once
    assert_problem(submit(client, h, ready_model, config={"epochs": 3}), 409, "conflict")
    # The same key under another API key is another job.
    other_model = db.add_model(keys["b"]["id"])
    third = submit(client, {**keys["b"]["headers"], "Idempotency-Key": "abc-123"}, other_model)
    assert third.status_code == 202 and third.json()["id"] != first.json()["id"]


def test_list_filters_and_cursor_pagination(client, keys, db):
    h = keys["b"]["headers"]
    model = db.add_model(keys["b"]["id"])
    made = [submit(client, h, model, **({"type": "evaluate", "config": {}} if i % 2 else {})).json()["id"]
            for i in range(5)]
    seen, after = [], None
    while True:
        params = {"limit": 2, "model_id": model, **({"after": after} if after else {})}
        page = client.get("/v1/jobs", headers=h, params=params).json()
        seen += [j["id"] for j in page["data"]]
        after = page["last_id"]
        if not page["has_more"]:
            break
    assert seen == list(reversed(made))
    evals = client.get("/v1/jobs", headers=h, params={"type": "evaluate", "model_id": model}).json()["data"]
    assert {j["id"] for j in evals} == {made[1], made[3]}
    db.update(Job, made[0], status="succeeded")
    done = client.get("/v1/jobs", headers=h, params={"status": "succeeded"}).json()["data"]
    assert [j["id"] for j in done] == [made[0]]
    # Another key sees none of them and cannot page from their cursor.
    assert made[0] not in [j["id"] for j in client.get("/v1/jobs", headers=keys["a"]["headers"]).json()["data"]]
    assert_problem(client.get("/v1/jobs", headers=keys["a"]["headers"], params={"after": made[2]}), 422,
                   "validation_error")


def test_cancel(client, keys, ready_model, db):
    h = keys["a"]["headers"]
    job = submit(client, h, ready_model).json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=h).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] and cancelled["cancel_requested_at"]
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=h).json()
    assert again["status"] == "cancelled" and again["finished_at"] == cancelled["finished_at"]
    assert db.count(JobEvent, JobEvent.job_id == job["id"], JobEvent.type == "status") == 2

    running = db.add_job(keys["a"]["id"], ready_model, status="running")
    out = client.post(f"/v1/jobs/{running}/cancel", headers=h).json()
    assert out["status"] == "cancelling" and out["cancel_requested_at"] and out["finished_at"] is None
    done = db.add_job(keys["a"]["id"], ready_model, status="succeeded")
    assert client.post(f"/v1/jobs/{done}/cancel", headers=h).json()["status"] == "succeeded"
    assert_problem(client.post(f"/v1/jobs/{running}/cancel", headers=keys["b"]["headers"]), 404, "not_found")


def parse_sse(text: str) -> list[dict]:
    events = []
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if line.startswith(":") or not line:
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "data" in fields:
            events.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return events


def test_events_json_and_sse_resume(client, keys, ready_model, db):
    h = keys["a"]["headers"]
    job = db.add_job(keys["a"]["id"], ready_model, status="running")
    ids = [db.add_event(job, "metrics", {"epoch": e, "w2_robust_accuracy": 0.1 * e}) for e in range(1, 4)]
    ids.append(db.add_event(job, "status", {"status": "succeeded"}))
    db.update(Job, job, status="succeeded", finished_at=utcnow())

    page = client.get(f"/v1/jobs/{job}/events", headers=h, params={"after": ids[0], "limit": 2}).json()
    assert [e["id"] for e in page["data"]] == ids[1:3] and page["has_more"] is True

    resp = client.get(f"/v1/jobs/{job}/events", headers={**h, "Accept": "text/event-stream"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert resp.text.startswith("retry: ")
    events = parse_sse(resp.text)
    assert [e["id"] for e in events] == ids
    assert [e["event"] for e in events] == ["metrics"] * 3 + ["status"]
    assert events[1]["data"]["data"] == {"epoch": 2, "w2_robust_accuracy": 0.2}

    resumed = client.get(f"/v1/jobs/{job}/events", headers={**h, "Accept": "text/event-stream",
                                                             "Last-Event-ID": str(ids[1])})
    assert [e["id"] for e in parse_sse(resumed.text)] == ids[2:]
    stream = {**keys["b"]["headers"], "Accept": "text/event-stream"}
    assert_problem(client.get(f"/v1/jobs/{job}/events", headers=stream), 404, "not_found")


def test_sse_streams_live_and_ends_when_the_job_finishes(app, keys, ready_model, db):
    """Over real HTTP: events written while the client listens arrive, keep-alives flow, and the
    stream closes once the job is terminal and every event was sent."""
    job = db.add_job(keys["a"]["id"], ready_model, status="running")
    first = db.add_event(job, "status", {"status": "running"})

    def worker() -> None:
        time.sleep(0.8)  # longer than the keep-alive interval
        db.add_event(job, "metrics", {"epoch": 1})
        time.sleep(0.2)
        db.add_event(job, "status", {"status": "succeeded"})
        db.update(Job, job, status="succeeded", finished_at=utcnow())

    with LiveServer(app) as live:
        t = threading.Thread(target=worker)
        t.start()
        start = time.monotonic()
        with httpx.stream("GET", f"{live.url}/v1/jobs/{job}/events",
                          headers={**keys["a"]["headers"], "Accept": "text/event-stream"}, timeout=15) as resp:
            text = "".join(resp.iter_text())
        t.join()
    assert time.monotonic() - start < 10
    assert ": keep-alive" in text
    events = parse_sse(text)
    assert events[0]["id"] == first and [e["event"] for e in events] == ["status", "metrics", "status"]
    assert events[-1]["data"]["data"] == {"status": "succeeded"}


def test_checkpoints_download_etag_and_report(client, keys, ready_model, db, settings):
    h = keys["a"]["headers"]
    job = db.add_job(keys["a"]["id"], ready_model, status="running")
    assert_problem(client.get(f"/v1/jobs/{job}/checkpoint", headers=h), 404, "not_found")
    assert_problem(client.get(f"/v1/jobs/{job}/report", headers=h), 404, "not_found")
    store = ArtifactStore(settings.resolved_artifact_dir)
    with db.Session() as s:
        c1 = record_artifact(s, store, kind="checkpoint", content=b"epoch-1 weights", filename="epoch-1.safetensors",
                             content_type="application/octet-stream", job_id=job, epoch=1, is_best=False,
                             data={"w2_robust_accuracy": 0.2})
        c2 = record_artifact(s, store, kind="checkpoint", content=b"epoch-2 weights", filename="epoch-2.safetensors",
                             content_type="application/octet-stream", job_id=job, epoch=2, is_best=True,
                             data={"w2_robust_accuracy": 0.3})
        record_artifact(s, store, kind="report", content=b'{"clean_accuracy": 0.9}', filename="report.json",
                        content_type="application/json", job_id=job)
        record_artifact(s, store, kind="plot", content=b"\x89PNG fake", filename="report.png",
                        content_type="image/png", job_id=job)
        s.commit()
        c1_id, c2_id = c1.id, c2.id

    listed = client.get(f"/v1/jobs/{job}/checkpoints", headers=h).json()["data"]
    assert [(c["id"], c["epoch"], c["is_best"]) for c in listed] == [(c1_id, 1, False), (c2_id, 2, True)]
    assert listed[1]["metrics"] == {"w2_robust_accuracy": 0.3}
    sha = hashlib.sha256(b"epoch-1 weights").hexdigest()
    assert listed[0]["sha256"] == sha and listed[0]["size"] == len(b"epoch-1 weights")

    got = client.get(f"/v1/jobs/{job}/checkpoints/{c1_id}/content", headers=h)
    assert got.content == b"epoch-1 weights" and got.headers["etag"] == f'"{sha}"'
    assert 'filename="epoch-1.safetensors"' in got.headers["content-disposition"]
    assert client.get(f"/v1/jobs/{job}/checkpoints/{c1_id}/content",
                      headers={**h, "If-None-Match": f'"{sha}"'}).status_code == 304
    assert client.get(f"/v1/jobs/{job}/checkpoints/{c1_id}/content",
                      headers={**h, "If-None-Match": '"other"'}).status_code == 200
    best = client.get(f"/v1/jobs/{job}/checkpoint", headers=h)
    assert best.content == b"epoch-2 weights"
    assert client.get(f"/v1/jobs/{job}/report", headers=h).json() == {"clean_accuracy": 0.9}
    png = client.get(f"/v1/jobs/{job}/report.png", headers=h)
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    assert_problem(client.get(f"/v1/jobs/{job}/checkpoints/{c1_id}/content", headers=keys["b"]["headers"]),
                   404, "not_found")
    assert_problem(client.get(f"/v1/jobs/{job}/checkpoints/art_nope/content", headers=h), 404, "not_found")


def test_enqueue_failure_marks_the_job_failed(pg_url, keys, ready_model, db, queues, tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.service.conftest import free_port, make_settings

    dead = make_settings(tmp_path, pg_url, queues, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(dead)) as c:
        start = time.monotonic()
        body = assert_problem(submit(c, keys["a"]["headers"], ready_model), 503, "broker_unavailable")
        assert time.monotonic() - start < 20
    job = db.get(Job, body["job_id"])
    assert job.status == "failed" and job.error["code"] == "broker_unavailable" and job.finished_at


def test_submit_resolves_auto_defaults_from_the_training_set(client, keys, ready_model):
    h = keys["a"]["headers"]
    job = submit(client, h, ready_model, config={}).json()          # digits: 1,438 training images
    assert (job["config"]["batch_size"], job["config"]["lr"], job["config"]["epochs"]) == (16, 0.0025, 8)
    assert job["config"]["selection"] == {"metric": "w2_robust_accuracy", "max_clean_drop": 0.1}
    few = submit(client, h, ready_model, config={"train_examples": 300}).json()
    assert (few["config"]["batch_size"], few["config"]["epochs"]) == (16, 10)
    explicit = submit(client, h, ready_model, config={"batch_size": 64, "lr": 0.01, "epochs": 3}).json()
    assert (explicit["config"]["batch_size"], explicit["config"]["lr"], explicit["config"]["epochs"]) == (64, 0.01, 3)
    evaluate = submit(client, h, ready_model, type="evaluate", config={}).json()
    assert evaluate["config"]["amp"] == "off" and evaluate["config"]["pgd_step_ratio"] == 0.25


def test_incompatible_model_and_dataset_is_422_naming_both_shapes(client, keys, ready_model, db, queues):
    from tests.service.payloads import npz_bytes

    h = keys["a"]["headers"]
    jobs, queued = db.count(Job), queues.length(queues.gpu)
    # the model reads 1×8×8 images with 10 classes (tests/service/conftest.py)
    body = assert_problem(submit(client, h, ready_model, dataset="cifar10"), 422, "incompatible_dataset")
    assert body["model_input_shape"] == [1, 8, 8] and body["dataset_image_shape"] == [3, 32, 32]
    assert "[1, 8, 8]" in body["detail"] and "[3, 32, 32]" in body["detail"] and "channel" in body["detail"]
    assert_problem(submit(client, h, ready_model, dataset="fashion-mnist", type="evaluate", config={}), 422,
                   "incompatible_dataset")                          # 28×28 images
    twelve = client.post("/v1/datasets", headers=h,
                         files={"file": ("d.npz", _npz_with_labels(24, 12), "application/octet-stream")})
    assert twelve.status_code == 201, twelve.text
    body = assert_problem(submit(client, h, ready_model, dataset=twelve.json()["id"]), 422, "incompatible_dataset")
    assert body["dataset_num_classes"] == 12 and body["model_num_classes"] == 10 and "labels 0..11" in body["detail"]
    assert db.count(Job) == jobs and queues.length(queues.gpu) == queued   # nothing stored, nothing queued
    fits = client.post("/v1/datasets", headers=h,
                       files={"file": ("f.npz", npz_bytes(n=40), "application/octet-stream")})
    assert submit(client, h, ready_model, dataset=fits.json()["id"]).status_code == 202


def _npz_with_labels(n: int, classes: int) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((n, 8, 8), dtype=np.uint8), y=(np.arange(n) % classes).astype(np.int64))
    return buf.getvalue()


def test_submit_answers_with_the_estimate_of_the_calibrated_workers(client, keys, ready_model, db, settings):
    from core.service.db import WorkerHeartbeat, record_worker_heartbeat

    headers = keys["a"]["headers"]
    # no worker has calibrated: a null estimate per device, with the reason; the submit goes through
    job = submit(client, headers, ready_model).json()
    assert job["estimate"]["devices"] == {} and "no worker has recorded a calibration" in job["estimate"]["reason"]
    assert job["estimate"]["kind"] == "small-cnn@1x8x8" and job["estimate"]["passes"]["cpu"]["total"] > 0
    cal = {"device_class": "cpu", "device_type": "cpu",
           "reference": {"architecture": "small-cnn", "input_shape": [3, 32, 32], "batch": 32, "params": 47818,
                         "seconds_per_unit": 1e-3}}
    with db.Session() as s:    # a worker of the jobs' queue; one that only validates models does not count
        record_worker_heartbeat(s, "estimate-test@host", [settings.gpu_queue], (2, "cpu"), cal)
        record_worker_heartbeat(s, "estimate-validator@host", [settings.cpu_queue], (2, "cpu"),
                                {**cal, "device_class": "cuda:X"})
        s.commit()
    try:
        short = submit(client, headers, ready_model).json()
        cpu = short["estimate"]["devices"]["cpu"]
        assert set(short["estimate"]["devices"]) == {"cpu"}
        assert short["estimate"]["reason"] is None and cpu["basis"] == "reference" and cpu["workers_seen"] == 1
        # the reference cost per unit times the units (small-cnn's at 8×8 costs 1/16 of the reference's
        # 32×32), with 5 s outside the recipe
        units = short["estimate"]["passes"]["cpu"]["total"]
        assert cpu["seconds"] == pytest.approx(5 + units * 1e-3 / 16, abs=0.1)
        # kept with the job (GET), not in lists; more epochs take longer
        assert client.get(f"/v1/jobs/{short['id']}", headers=headers).json()["estimate"] == short["estimate"]
        listed = client.get("/v1/jobs", headers=headers, params={"limit": 1}).json()["data"][0]
        assert listed["id"] == short["id"] and listed["estimate"] is None
        longer = submit(client, headers, ready_model, config={"epochs": 6}).json()
        assert longer["estimate"]["devices"]["cpu"]["seconds"] > cpu["seconds"]
        evaluation = submit(client, headers, ready_model, type="evaluate", config={"n_examples": 50}).json()
        assert evaluation["estimate"]["passes"]["cpu"]["audit"] > 0
        assert evaluation["estimate"]["devices"]["cpu"]["seconds"] > 5
    finally:
        with db.Session() as s:
            for name in ("estimate-test@host", "estimate-validator@host"):
                s.delete(s.get(WorkerHeartbeat, name))
            s.commit()
