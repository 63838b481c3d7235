"""One job setup for one device and for DDP ranks (worker/inputs.py `set_up_job`), on PostgreSQL.

The worker's task body (`worker.jobs.run_job`) runs here in the test process, as a Celery pool
process runs it; a job with `devices: 2` starts two real `python -m worker.ddp` ranks (gloo on
the CPU) that read the same database and artifact store. Both paths must write a report whose
provenance names the job, the model, the data set and the weights' sha256, and both must fail
a job whose model row is gone with the same clear error.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import torch
from sqlalchemy import select

import worker.runtime
from core.engine.checkpoint import save_weights
from core.engine.config import FinetuneConfig
from core.engine.defaults import resolve_finetune
from core.engine.zoo import create_model
from core.service.db import Artifact, Job, JobEvent, Model, new_id, utcnow
from core.service.settings import get_settings
from core.storage.artifacts import artifact_relpath, record_artifact
from worker.jobs import run_job
from worker.runtime import Runtime, runtime

pytestmark = pytest.mark.timeout(300)

# One short epoch of W-TRADES on digits; the batch splits evenly over two ranks.
TINY = {"threat_model": {"kind": "w2-linf", "delta": 0.1}, "epochs": 1, "batch_size": 64, "lr": 0.01, "beta": 3.0,
        "attack_steps": 2, "train_examples": 256, "validation_examples": 64, "test_examples": 64,
        "budget_subset": 64, "eval_wpgd_steps": 2, "eval_pgd_steps": 2, "test_wpgd_steps": 2, "test_pgd_steps": 2,
        "augment": "none", "amp": "off", "seed": 0}


@pytest.fixture(scope="module")
def worker_env(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """The worker's settings from the environment (as the DDP ranks, fresh interpreters, read them)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ROBUSTIFY_DATABASE_URL", pg_url)
    mp.setenv("ROBUSTIFY_DATA_DIR", str(tmp_path_factory.mktemp("worker-data")))
    mp.setenv("ROBUSTIFY_ALLOW_DOWNLOAD", "false")
    mp.setenv("OMP_NUM_THREADS", "1")
    get_settings.cache_clear()
    mp.setattr(worker.runtime, "_runtime", None)
    try:
        yield runtime()
    finally:
        runtime().engine.dispose()
        mp.undo()
        get_settings.cache_clear()


def _digits_model(rt: Runtime, tmp_path: Path) -> tuple[str, str]:
    """A ready small-cnn for digits with stored weights: (model id, the weights' sha256)."""
    torch.manual_seed(0)
    save_weights(create_model("small-cnn", num_classes=10, in_channels=1, image_size=8).state_dict(),
                 tmp_path / "cnn.safetensors")
    with rt.session() as s:
        art = record_artifact(s, rt.store, kind="model_weights", src_path=tmp_path / "cnn.safetensors",
                              filename="cnn.safetensors", content_type="application/octet-stream")
        m = Model(id=new_id("mdl"), name="cnn", source="upload", architecture="small-cnn", num_classes=10,
                  dataset="digits", input_shape=[1, 8, 8], input_mean=[0.0], input_std=[1.0], status="ready",
                  weights_artifact_id=art.id)
        s.add(m)
        s.commit()
        return m.id, art.sha256


def _queued_finetune(rt: Runtime, model_id: str, devices: int) -> str:
    config = resolve_finetune(FinetuneConfig(**TINY, devices=devices), 256).model_dump(mode="json")
    with rt.session() as s:
        job = Job(id=new_id("job"), type="finetune", status="queued", model_id=model_id, dataset="digits",
                  threat_model=config["threat_model"], config=config, seed=0, attempt=0, max_attempts=1,
                  created_at=utcnow())
        s.add(job)
        s.commit()
        return job.id


def _job(rt: Runtime, job_id: str) -> Job:
    with rt.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def _report(rt: Runtime, job_id: str) -> dict[str, Any]:
    with rt.session() as s:
        art = s.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "report"))
        assert art is not None, f"job {job_id} stored no report"
        return json.loads(rt.store.local_path(artifact_relpath(art)).read_bytes())


def _drop_model_row(pg_url: str, model_id: str) -> None:
    """Remove the row under its jobs' foreign key (a row that is gone however it went: the
    worker must say so, not crash on None)."""
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # foreign-key triggers off, this session only
        conn.execute("DELETE FROM models WHERE id = %s", (model_id,))


@pytest.mark.parametrize("devices", [1, 2], ids=["one-device", "two-ddp-ranks"])
def test_the_report_names_the_job_model_dataset_and_weights(worker_env: Runtime, tmp_path: Path,
                                                            devices: int) -> None:
    rt = worker_env
    model_id, sha256 = _digits_model(rt, tmp_path)
    job_id = _queued_finetune(rt, model_id, devices)
    assert run_job(job_id) == "succeeded"
    job = _job(rt, job_id)
    assert job.status == "succeeded" and job.error is None
    provenance = _report(rt, job_id)["provenance"]
    assert {k: provenance.get(k) for k in ("job_id", "model_id", "dataset", "model_sha256")} == {
        "job_id": job_id, "model_id": model_id, "dataset": "digits", "model_sha256": sha256}
    with rt.session() as s:  # the job ran where it says: a DDP launch event only on the two-rank path
        launches = s.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "log")).all()
    assert [d["devices"] for d in launches if d and "devices" in d] == ([2] if devices == 2 else [])


def test_a_job_whose_model_row_is_gone_fails_alike_on_one_device_and_on_two(worker_env: Runtime, pg_url: str,
                                                                            tmp_path: Path) -> None:
    rt = worker_env
    errors = {}
    for devices in (1, 2):
        model_id, _ = _digits_model(rt, tmp_path)
        job_id = _queued_finetune(rt, model_id, devices)
        _drop_model_row(pg_url, model_id)
        assert run_job(job_id) == "failed"
        job = _job(rt, job_id)
        assert job.status == "failed", job.status
        errors[devices] = {**job.error, "message": job.error["message"].replace(model_id, "<model>")}
    assert errors[1] == errors[2]
    assert errors[1]["code"] == "validation_error"
    assert errors[1]["message"].startswith("model <model> no longer exists"), errors[1]
