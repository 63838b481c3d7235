"""What can be known at submit is refused at submit (issue 18, points 6 and 7), against
PostgreSQL and Redis: nothing is stored or queued by a refused request.

- `devices` beyond what every live worker of the queue says it has (its heartbeat row);
- `train_examples` below 2, or a data set whose training split is smaller;
- hub names with a trailing newline or dot, and path-like revisions;
- family architecture names that are paths, or that the family's listed names do not hold;
- a key's queued jobs beyond ROBUSTIFY_MAX_QUEUED_JOBS_PER_KEY (429 with Retry-After), while
  another key still submits.
"""
from __future__ import annotations

import time

import pytest

from core.service.db import Job, Model, WorkerHeartbeat, record_worker_heartbeat
from tests.service.conftest import make_settings
from tests.service.payloads import safetensors_bytes
from tests.service.test_models_api import FIELDS, assert_problem, upload

QUEUED_SHARE = 4


@pytest.fixture(scope="module")
def settings(tmp_path_factory, pg_url, queues):
    return make_settings(tmp_path_factory.mktemp("data"), pg_url, queues, max_queued_jobs_per_key=QUEUED_SHARE)


@pytest.fixture(scope="module")
def ready_model(db, keys) -> str:
    return db.add_model(keys["a"]["id"], status="ready")


def submit(client, headers, model_id, **over):
    body = {"type": "finetune", "model_id": model_id, "dataset": "digits",
            "threat_model": {"kind": "w2-linf", "delta": 0.05}, "config": {"epochs": 1}, **over}
    return client.post("/v1/jobs", headers=headers, json=body)


def _nothing_stored(db, queues):
    jobs, models, queued = db.count(Job), db.count(Model), queues.length(queues.gpu)
    return lambda: (db.count(Job), db.count(Model), queues.length(queues.gpu)) == (jobs, models, queued)


@pytest.fixture
def workers(pg_url, settings):
    """Heartbeat rows as live workers write them (worker/sweep.py), removed afterwards."""
    from core.service.sessions import make_engine, make_sessionmaker

    engine = make_engine(pg_url)
    maker = make_sessionmaker(engine)
    names: list[str] = []

    def beat(name: str, devices: tuple[int, str] | None, queue: str | None = None) -> None:
        with maker() as s:
            record_worker_heartbeat(s, name, [queue or settings.gpu_queue], devices)
            s.commit()
        names.append(name)

    yield beat
    with maker() as s:
        for name in names:
            row = s.get(WorkerHeartbeat, name)
            if row is not None:
                s.delete(row)
        s.commit()
    engine.dispose()


def test_devices_beyond_every_live_worker_are_refused(client, keys, ready_model, db, queues, workers):
    h = keys["a"]["headers"]
    workers("cpu0@f", (2, "cpu"))
    workers("gpu0@f", (4, "cuda"))
    workers("other@f", (8, "cuda"), queue="some-other-queue")  # serves no job queue: does not count
    unchanged = _nothing_stored(db, queues)
    body = assert_problem(submit(client, h, ready_model, config={"epochs": 1, "devices": 8, "batch_size": 64}),
                          422, "not_enough_devices")
    assert body["available"] == 4 and body["devices"] == 8 and "config.devices" in [e["field"] for e in body["errors"]]
    assert unchanged()
    ok = submit(client, h, ready_model, config={"epochs": 1, "devices": 4, "batch_size": 64})
    assert ok.status_code == 202, ok.text
    client.post(f"/v1/jobs/{ok.json()['id']}/cancel", headers=h)


def test_devices_are_accepted_while_a_worker_has_not_said(client, keys, ready_model, workers):
    """A worker that has not probed its devices yet (null): the API cannot know, the worker checks."""
    h = keys["a"]["headers"]
    workers("cpu0@f", (1, "cpu"))
    workers("starting@f", None)
    resp = submit(client, h, ready_model, config={"epochs": 1, "devices": 2, "batch_size": 64})
    assert resp.status_code == 202, resp.text
    client.post(f"/v1/jobs/{resp.json()['id']}/cancel", headers=h)


@pytest.mark.parametrize("train_examples", [0, 1])
def test_fewer_than_two_training_images_is_422(client, keys, ready_model, db, queues, train_examples):
    unchanged = _nothing_stored(db, queues)
    body = assert_problem(submit(client, keys["a"]["headers"], ready_model,
                                 config={"epochs": 1, "train_examples": train_examples}), 422, "validation_error")
    assert "config.train_examples" in [e["field"] for e in body["errors"]], body
    assert unchanged()
    ok = submit(client, keys["a"]["headers"], ready_model, config={"epochs": 1, "train_examples": 2})
    assert ok.status_code == 202, ok.text
    client.post(f"/v1/jobs/{ok.json()['id']}/cancel", headers=keys["a"]["headers"])


@pytest.mark.parametrize("over, field", [
    ({"name": "timm/resnet18.a1_in1k\n"}, "name"),
    ({"name": "timm/resnet18."}, "name"),
    ({"name": "timm/../resnet18"}, "name"),
    ({"revision": "../../etc"}, "revision"),
    ({"revision": "/main"}, "revision"),
    ({"revision": "refs//pr"}, "revision"),
    ({"revision": "main\n"}, "revision"),
])
def test_bad_hub_names_and_revisions_are_422(client, keys, db, queues, over, field):
    unchanged = _nothing_stored(db, queues)
    hub = {"source": "hf-hub", "name": "timm/resnet18.a1_in1k", "num_classes": 10, "dataset": "cifar10", **over}
    body = assert_problem(client.post("/v1/models", headers=keys["a"]["headers"], json=hub), 422, "validation_error")
    assert field in [e["field"] for e in body["errors"]], body
    assert unchanged()


def test_a_good_hub_revision_is_accepted(client, keys):
    hub = {"source": "hf-hub", "name": "timm/resnet18.a1_in1k", "revision": "refs/pr/1", "num_classes": 10,
           "dataset": "cifar10"}
    resp = client.post("/v1/models", headers=keys["b"]["headers"], json=hub)
    assert resp.status_code == 201, resp.text
    assert resp.json()["architecture"] == "timm:hf-hub:timm/resnet18.a1_in1k@refs/pr/1"


@pytest.mark.parametrize("architecture", ["timm:../../etc/passwd", "torchvision:a/b", "robustbench:x..y",
                                          "timm:-rf"])
def test_path_like_family_names_are_refused_at_once(client, keys, db, queues, architecture):
    unchanged = _nothing_stored(db, queues)
    body = assert_problem(upload(client, keys["a"]["headers"], safetensors_bytes(),
                                 {**FIELDS, "architecture": architecture}), 422, "unsupported_architecture")
    assert body["errors"][0]["field"] == "architecture" and "not a" in body["detail"]
    assert unchanged()


def _listed(client, headers, family: str, timeout: float = 240) -> None:
    """Wait until the server has listed a family's names (its background subprocess, api/catalog.py)."""
    deadline = time.monotonic() + timeout
    while client.get("/v1/architectures", params={"family": family}, headers=headers).status_code == 503:
        assert time.monotonic() < deadline, f"{family} not listed in {timeout} s"
        time.sleep(0.5)


def test_names_the_family_does_not_list_are_refused_with_close_ones(client, keys, db, queues):
    h = keys["a"]["headers"]
    _listed(client, h, "timm")
    unchanged = _nothing_stored(db, queues)
    body = assert_problem(upload(client, h, safetensors_bytes(), {**FIELDS, "architecture": "timm:resnet19"}),
                          422, "unsupported_architecture")
    assert "timm:resnet18" in body["detail"] and "Did you mean" in body["detail"], body
    assert unchanged()
    fields = {"num_classes": "10", "dataset": "digits", "input_size": "1,8,8"}
    for known in ("timm:resnet18", "timm:resnet18.a1_in1k"):  # a pretrained tag names the same architecture
        resp = upload(client, h, safetensors_bytes(seed=5), {**fields, "architecture": known})
        assert resp.status_code == 201, resp.text


def test_queued_jobs_per_key_are_a_fair_share(client, keys, ready_model, db, queues):
    a, b = keys["a"]["headers"], keys["b"]["headers"]
    queued = db.count(Job, Job.owner_key_id == keys["a"]["id"], Job.status == "queued")
    ids = []
    for _ in range(QUEUED_SHARE - queued):
        resp = submit(client, a, ready_model)
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    unchanged = _nothing_stored(db, queues)
    resp = submit(client, a, ready_model)
    body = assert_problem(resp, 429, "too_many_queued_jobs")
    assert int(resp.headers["retry-after"]) > 0 and body["limit"] == QUEUED_SHARE and body["queued"] == QUEUED_SHARE
    assert "ROBUSTIFY_MAX_QUEUED_JOBS_PER_KEY" in body["detail"]
    assert unchanged()
    other = submit(client, b, db.add_model(keys["b"]["id"], status="ready"))  # another tenant is not affected
    assert other.status_code == 202, other.text
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=a)  # a cancelled job frees its place
    resp = submit(client, a, ready_model)
    assert resp.status_code == 202, resp.text
