"""The job claim and the recovery sweep against real databases (PostgreSQL and SQLite).

Many threads claim the same job at once: exactly one may run it. The sweep re-enqueues exactly
the jobs whose owner is gone.
"""
from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from core.service.db import Job, JobEvent, Model, new_id, utcnow
from core.service.sessions import make_engine, make_sessionmaker
from core.service.settings import Settings
from worker.claim import claim_job
from worker.runtime import HOSTNAME, Runtime, worker_id
from worker.sweep import Sweeper

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["postgresql", "sqlite"])
def rt(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    import migrations
    from core.storage.artifacts import ArtifactStore

    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'claim.db'}"
        migrations.upgrade(url)
    settings = Settings(data_dir=tmp_path, database_url=url, stale_heartbeat_seconds=30, max_attempts=3)
    engine = make_engine(url)
    yield Runtime(settings, engine, make_sessionmaker(engine), ArtifactStore(tmp_path / "artifacts"), 0)
    engine.dispose()


def _job(rt: Runtime, **fields: Any) -> str:
    with rt.session() as s:
        model = Model(id=new_id("mdl"), name="m", source="upload", architecture="small-cnn", num_classes=10,
                      dataset="digits", status="ready")
        s.add(model)
        s.flush()
        job = Job(id=new_id("job"), type="finetune", model_id=model.id, dataset="digits", threat_model={},
                  config={}, max_attempts=3, **{"status": "queued", "attempt": 0, **fields})
        s.add(job)
        s.commit()
        return job.id


def _get(rt: Runtime, job_id: str) -> Job:
    with rt.session() as s:
        return s.get(Job, job_id)


def test_concurrent_claims_run_the_job_once(rt: Runtime) -> None:
    job_id = _job(rt)
    results: list[Any] = []
    barrier = threading.Barrier(6)

    def claim(i: int) -> None:
        barrier.wait()
        results.append(claim_job(rt, job_id, f"{HOSTNAME}:{i}-elsewhere"))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.run for r in results) == 1, results
    assert [r.attempt for r in results if r.run] == [1]
    job = _get(rt, job_id)
    # the attempt is counted by the run's first write, not by the claim
    assert job.status == "running" and job.attempt == 0
    with rt.session() as s:
        starts = s.query(JobEvent).filter(JobEvent.job_id == job_id, JobEvent.message.like("job started%")).count()
    assert starts == 1


def test_claim_rules(rt: Runtime) -> None:
    now = utcnow()
    # terminal: skipped
    done = _job(rt, status="succeeded")
    assert not claim_job(rt, done, worker_id()).run
    # another live worker's fresh heartbeat: a duplicate delivery is refused
    busy = _job(rt, status="running", attempt=1, worker_id="other-host:1", heartbeat_at=now)
    assert not claim_job(rt, busy, worker_id()).run
    assert _get(rt, busy).attempt == 1
    # a stale heartbeat: taken over as the next attempt
    stale = _job(rt, status="running", attempt=1, worker_id="other-host:1", heartbeat_at=now - timedelta(minutes=5))
    c = claim_job(rt, stale, worker_id())
    assert c.run and c.attempt == 2 and _get(rt, stale).worker_id == worker_id()
    # a fresh heartbeat from a process on this host that no longer exists: taken over at once
    dead = _job(rt, status="running", attempt=1, worker_id=f"{HOSTNAME}:999999", heartbeat_at=now)
    assert claim_job(rt, dead, worker_id()).run
    # attempts used up: failed with worker_lost
    spent = _job(rt, status="running", attempt=3, worker_id="other-host:1", heartbeat_at=now - timedelta(minutes=5))
    assert not claim_job(rt, spent, worker_id()).run
    job = _get(rt, spent)
    assert job.status == "failed" and job.error["code"] == "worker_lost"
    # this very process owned the run (it ended without an outcome, e.g. the database was down):
    # claimed again at once, without waiting for the heartbeat to go stale
    own = _job(rt, status="running", attempt=1, worker_id=worker_id(), heartbeat_at=now)
    c = claim_job(rt, own, worker_id())
    assert c.run and c.attempt == 2 and _get(rt, own).attempt == 1
    # cancel requested while its worker was gone: cancelled, not run
    cancelling = _job(rt, status="cancelling", attempt=1, worker_id="other-host:1",
                      heartbeat_at=now - timedelta(minutes=5), cancel_requested_at=now)
    assert not claim_job(rt, cancelling, worker_id()).run
    assert _get(rt, cancelling).status == "cancelled"


def test_sweep_requeues_only_orphaned_jobs(rt: Runtime) -> None:
    assert rt.settings.queued_requeue_seconds == 60.0
    now = utcnow()
    orphan = _job(rt, status="running", attempt=1, worker_id="other-host:1", heartbeat_at=now - timedelta(minutes=5))
    dead_local = _job(rt, status="cancelling", attempt=1, worker_id=f"{HOSTNAME}:999999", heartbeat_at=now)
    alive = _job(rt, status="running", attempt=1, worker_id="other-host:1", heartbeat_at=now)
    old_queued = _job(rt, status="queued", created_at=now - timedelta(minutes=3))
    new_queued = _job(rt, status="queued", created_at=now)
    finished = _job(rt, status="failed", heartbeat_at=now - timedelta(hours=1))
    sent: list[str] = []
    sweeper = Sweeper(rt, sent.append)
    mine = {orphan, dead_local, alive, old_queued, new_queued, finished}
    assert {j for j in sweeper.sweep() if j in mine} == {orphan, dead_local, old_queued}
    # sent once: the next sweep right after does not flood the queue with duplicates
    assert not [j for j in sweeper.sweep() if j in mine]


def test_runs_lost_before_any_work_cost_no_attempt_but_are_capped(rt: Runtime) -> None:
    """A worker killed while loading (before the recipe's first write) does not use an attempt; a
    job whose workers keep dying that early still fails after max_attempts such runs. Runs handed
    back at a shutdown count neither way."""
    job_id = _job(rt)
    stale = utcnow() - timedelta(minutes=5)
    for n in range(3):
        c = claim_job(rt, job_id, f"other-host:{n}")
        assert c.run and c.attempt == 1, c  # the same attempt number each time: none was used
        with rt.session() as s:
            job = s.get(Job, job_id)
            if n == 1:  # handed back at a shutdown: not a lost run
                job.status, job.worker_id, job.heartbeat_at = "queued", None, None
                s.add(JobEvent(job_id=job_id, type="status", message="handed back",
                               data={"status": "queued", "reason": "handed_back"}))
            else:
                job.heartbeat_at = stale  # its worker died before writing anything
            s.commit()
    assert _get(rt, job_id).attempt == 0
    assert claim_job(rt, job_id, "other-host:9").run  # two lost runs so far: a third try
    with rt.session() as s:
        s.get(Job, job_id).heartbeat_at = stale
        s.commit()
    assert not claim_job(rt, job_id, "other-host:10").run
    job = _get(rt, job_id)
    assert job.status == "failed" and job.error["code"] == "worker_lost"
    assert "before the job started computing" in job.error["message"]


def test_runs_lost_while_resuming_say_so(rt: Runtime) -> None:
    """A job that had trained 7 epochs and then lost its workers while they loaded its training
    state fails naming the resume, not 'while loading its model or data' as if it never started."""
    job_id = _job(rt, attempt=2, resume_artifact_id="art_state")
    with rt.session() as s:
        for attempt in (1, 2):  # the two attempts that trained
            s.add(JobEvent(job_id=job_id, type="status", message="job started",
                           data={"status": "running", "attempt": attempt}))
        s.add(JobEvent(job_id=job_id, type="checkpoint", message="checkpoint after epoch 7",
                       data={"epoch": 7, "total_epochs": 10, "training_state_id": "art_state", "partial": False}))
        s.commit()
    stale = utcnow() - timedelta(minutes=5)
    for n in range(3):
        claim = claim_job(rt, job_id, f"other-host:{n}")
        assert claim.run and claim.resume_artifact_id == "art_state"
        with rt.session() as s:
            s.get(Job, job_id).heartbeat_at = stale  # died while loading, before any write
            s.commit()
    assert not claim_job(rt, job_id, "other-host:9").run
    message = _get(rt, job_id).error["message"]
    assert "resumed computing" in message and "after epoch 7" in message
    assert "while loading its model or data)" not in message


def test_a_task_that_cannot_read_its_job_gives_its_message_back(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """The database is unreachable when a message arrives: the task retries, then rejects the message
    with requeue (the broker delivers it again) instead of acknowledging and so dropping it."""
    import time

    from celery.exceptions import Reject

    import worker.runtime
    from core.service.settings import get_settings
    from tests.e2e.conftest import free_port
    from worker.jobs import run_job
    from worker.tasks import _requeued_on_outage
    from worker.validate import validate_model

    monkeypatch.setenv("ROBUSTIFY_DATABASE_URL", f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone")
    monkeypatch.setenv("ROBUSTIFY_STALE_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("ROBUSTIFY_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    monkeypatch.setattr(worker.runtime, "_runtime", None)
    try:
        for task, ident in ((run_job, "job_x"), (validate_model, "mdl_x")):
            start = time.monotonic()
            with pytest.raises(Reject) as rejected:
                _requeued_on_outage(task, ident)
            assert rejected.value.requeue is True
            assert time.monotonic() - start >= 0.5  # retried before giving the message back
    finally:
        get_settings.cache_clear()
        worker.runtime._runtime = None
