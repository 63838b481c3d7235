"""Idempotency-Key with auth off (owner NULL) on the embedded SQLite database: the database itself
refuses a second owner-less job with the same key, so concurrent retries give one job."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import IntegrityError

import migrations
from api.app import create_app
from core.service.db import Job, new_id, utcnow
from core.service.settings import Settings
from tests.service.conftest import REDIS_URL, Db


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, queues):
    settings = Settings(data_dir=tmp_path_factory.mktemp("idem"), broker_url=REDIS_URL,
                        gpu_queue=queues.gpu, cpu_queue=queues.cpu, auth="off")
    assert settings.is_embedded and settings.auth_decided is False
    migrations.upgrade(settings.resolved_database_url)
    db = Db(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:
        yield client, db
    db.close()


def _job(model_id: str, key: str | None, owner: str | None = None) -> Job:
    return Job(id=new_id("job"), owner_key_id=owner, type="finetune", status="queued", model_id=model_id,
               dataset="digits", threat_model={}, config={}, seed=0, attempt=0, max_attempts=3,
               idempotency_key=key, created_at=utcnow())


def test_database_refuses_a_second_ownerless_job_with_the_same_key(embedded):
    _, db = embedded
    model_id = db.add_model(None)
    with db.Session() as s:
        s.add(_job(model_id, "dup"))
        s.commit()
        s.add(_job(model_id, "dup"))
        with pytest.raises(IntegrityError):
            s.commit()
        s.rollback()
        # Jobs without a key, and an owner's job with the same key, are still allowed.
        s.add_all([_job(model_id, None), _job(model_id, None), _job(model_id, "dup", owner="key_x")])
        s.commit()
    assert db.count(Job, Job.idempotency_key == "dup") == 2


def test_concurrent_submissions_with_one_key_make_one_job(embedded, queues):
    client, db = embedded
    model_id = db.add_model(None)
    body = {"type": "evaluate", "model_id": model_id, "dataset": "digits"}
    gpu = queues.length(queues.gpu)

    def submit(_: int):
        return client.post("/v1/jobs", headers={"Idempotency-Key": "race"}, json=body)

    with ThreadPoolExecutor(max_workers=6) as pool:
        replies = list(pool.map(submit, range(6)))
    assert [r.status_code for r in replies] == [202] * 6, [r.text for r in replies]
    assert len({r.json()["id"] for r in replies}) == 1
    assert db.count(Job, Job.idempotency_key == "race") == 1
    assert queues.length(queues.gpu) == gpu + 1  # queued once
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in replies) == 5

    retry = submit(0)
    assert retry.status_code == 202 and retry.json()["id"] == replies[0].json()["id"]
    assert retry.headers["Idempotent-Replayed"] == "true"
