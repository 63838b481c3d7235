"""The Python SDK (`robustify`) against a live uvicorn server on PostgreSQL and Redis.

The worker's side of a job is written straight into the database (as the other API tests do);
tests/e2e/test_webhooks_logs_e2e.py drives the SDK against real workers.
"""
from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import threading
from typing import Any

import numpy as np
import pytest

import migrations
import robustify
from core.service.db import Job, JobEvent, utcnow
from core.storage.artifacts import ArtifactStore, record_artifact
from tests.service.conftest import LiveServer, make_settings
from tests.service.payloads import npz_bytes, pickle_bytes, safetensors_bytes


@pytest.fixture(scope="module")
def live(app):
    with LiveServer(app) as server:
        yield server


@pytest.fixture
def sdk(live, keys):
    with robustify.Client(live.url, api_key=keys["a"]["key"], max_retries=0) as client:
        yield client


def test_importing_the_sdk_loads_no_torch_nor_the_service():
    code = ("import sys, robustify; from robustify import Client; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'numpy', 'fastapi', 'sqlalchemy', 'celery', 'api', 'core', 'worker', 'cli'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_sdk_copy_of_the_job_vocabulary_is_the_servers():
    """The SDK installs without the server, so it spells the job states itself: the same ones."""
    from core import states
    from robustify import types

    assert types.JOB_STATES == states.JOB_STATES and types.JOB_TYPES == states.JOB_TYPES
    assert types.TERMINAL_STATUSES == states.TERMINAL_STATES
    assert types.JobStatus == states.JobStatus and types.JobType == states.JobType


def test_models_and_datasets(sdk, tmp_path, live, keys):
    weights = tmp_path / "cnn.safetensors"
    weights.write_bytes(safetensors_bytes(seed=4))
    model = sdk.models.upload(weights, architecture="small-cnn", num_classes=10, dataset="digits",
                              metadata={"team": "vision"})
    assert isinstance(model, robustify.Model)
    assert model.status == "validating" and model.input_shape == [1, 8, 8] and model.metadata == {"team": "vision"}
    assert model.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sdk.models.get(model.id).id == model.id
    assert model.id in [m.id for m in sdk.models.list()]
    saved = sdk.models.download(model.id, tmp_path / "back.safetensors")
    assert saved.read_bytes() == weights.read_bytes()

    bad_file = tmp_path / "model.pt"
    bad_file.write_bytes(pickle_bytes())
    with pytest.raises(robustify.ValidationError) as bad:
        sdk.models.upload(bad_file, architecture="small-cnn", num_classes=10, dataset="digits")
    assert bad.value.code == "invalid_model_file" and bad.value.status == 422

    assert sdk.models.delete(model.id).deleted
    with pytest.raises(robustify.NotFoundError) as gone:
        sdk.models.get(model.id)
    assert gone.value.code == "not_found" and model.id in str(gone.value)

    data = tmp_path / "tiny.npz"
    data.write_bytes(npz_bytes(n=12))
    ds = sdk.datasets.upload(data, name="tiny")
    assert (ds.num_examples, ds.image_shape, ds.name) == (12, [1, 8, 8], "tiny")
    assert sdk.datasets.get(ds.id).num_classes == ds.num_classes
    assert [d.id for d in sdk.datasets.list()].count(ds.id) == 1
    sdk.datasets.delete(ds.id)
    with pytest.raises(robustify.NotFoundError):
        sdk.datasets.get(ds.id)

    with (robustify.Client(live.url, api_key="rk_wrong", max_retries=0) as stranger,
          pytest.raises(robustify.AuthenticationError) as denied):
        stranger.models.list()
    assert denied.value.code == "unauthorized" and "ROBUSTIFY_API_KEY" in str(denied.value)


def test_job_create_list_pages_and_errors(sdk, db, keys):
    model_id = db.add_model(keys["a"]["id"], status="ready")
    job = sdk.jobs.create(type="finetune", model_id=model_id, dataset="digits",
                          threat_model={"kind": "w2-linf", "delta": "1/20"}, config={"epochs": 2},
                          metadata={"run": 1}, idempotency_key="sdk-test-1")
    assert isinstance(job, robustify.Job) and job.status == "queued" and not job.done
    assert job.threat_model["delta"] == pytest.approx(0.05) and job.config["epochs"] == 2
    again = sdk.jobs.create(type="finetune", model_id=model_id, dataset="digits",
                            threat_model={"kind": "w2-linf", "delta": 0.05}, config={"epochs": 2},
                            metadata={"run": 1}, idempotency_key="sdk-test-1")
    assert again.id == job.id

    ids = [sdk.jobs.create(type="evaluate", model_id=model_id, dataset="digits").id for _ in range(3)]
    first = sdk.jobs.list(model_id=model_id, limit=2)
    assert len(first.data) == 2 and first.has_more
    assert [j.id for j in first] == [*reversed(ids), job.id]  # newest first, across pages
    assert [j.id for j in sdk.jobs.list(model_id=model_id, type="finetune")] == [job.id]

    with pytest.raises(robustify.ValidationError) as bad:
        sdk.jobs.create(type="finetune", model_id=model_id, dataset="digits", config={"epochs": 0})
    assert bad.value.code == "validation_error"
    assert [e["field"] for e in bad.value.errors] == ["config.epochs"]
    with pytest.raises(ValueError, match="fraction"):
        sdk.jobs.create(type="finetune", model_id=model_id, dataset="digits", threat_model={"delta": "8/x"})

    cancelled = sdk.jobs.cancel(ids[0])
    assert cancelled.status == "cancelled" and cancelled.done and sdk.jobs.cancel(ids[0]).status == "cancelled"


def test_job_stream_wait_checkpoints_download(sdk, db, keys, settings, tmp_path):
    model_id = db.add_model(keys["a"]["id"], status="ready")
    job = sdk.jobs.create(type="finetune", model_id=model_id, dataset="digits", config={"epochs": 2})
    store = ArtifactStore(settings.resolved_artifact_dir)
    epoch_weights = {1: safetensors_bytes(seed=11), 2: safetensors_bytes(seed=12)}

    def fake_worker() -> None:  # the worker's writes, straight into the database
        db.update(Job, job.id, status="running", started_at=utcnow(), attempt=1)
        db.add_event(job.id, "status", {"status": "running", "attempt": 1})
        ids = {}
        with db.Session() as s:
            for epoch, content in epoch_weights.items():
                ids[epoch] = record_artifact(s, store, kind="checkpoint", content=content,
                                             filename=f"epoch{epoch}.safetensors",
                                             content_type="application/octet-stream", job_id=job.id, epoch=epoch,
                                             is_best=epoch == 2).id
            record_artifact(s, store, kind="report", content=b'{"best_epoch": 2}', filename="report.json",
                            content_type="application/json", job_id=job.id)
            s.commit()
        for epoch in (1, 2):
            db.add_event(job.id, "metrics", {"epoch": epoch, "clean_accuracy": 0.9})
        with db.Session() as s:  # the status and its event in one commit, as the worker writes them
            row = s.get(Job, job.id)
            row.status, row.finished_at, row.result = "succeeded", utcnow(), {"best_checkpoint_id": ids[2]}
            s.add(JobEvent(job_id=job.id, type="status", data={"status": "succeeded"}))
            s.commit()

    worker = threading.Thread(target=fake_worker)
    worker.start()
    streamed = list(sdk.jobs.stream(job.id))
    worker.join()
    assert all(isinstance(e, robustify.Event) for e in streamed)
    assert [e.type for e in streamed] == ["status", "status", "metrics", "metrics", "status"]
    assert streamed[-1].data == {"status": "succeeded"}
    assert [e.id for e in streamed] == sorted(e.id for e in streamed)
    paged = sdk.jobs.events(job.id, limit=2)
    assert len(paged.data) == 2 and [e.id for e in paged] == [e.id for e in streamed]
    assert [e.id for e in sdk.jobs.stream(job.id, after=streamed[2].id)] == [e.id for e in streamed[3:]]

    done = sdk.jobs.wait(job.id, timeout=10)
    assert done.succeeded and done.result["best_checkpoint_id"]
    ckpts = sdk.jobs.checkpoints(job.id)
    assert [(c.epoch, c.is_best) for c in ckpts] == [(1, False), (2, True)]

    got = sdk.jobs.download(job.id, tmp_path / "dl")
    assert got.checkpoint.read_bytes() == epoch_weights[2] and got.checkpoint.name == "epoch2.safetensors"
    assert got.report.read_text() == '{"best_epoch": 2}' and got.plot is None
    first = sdk.jobs.download(job.id, tmp_path / "e1", epoch=1, report=False, plot=False)
    assert first.checkpoint.read_bytes() == epoch_weights[1]
    with pytest.raises(robustify.NotFoundError):
        sdk.jobs.download(job.id, tmp_path / "e9", epoch=9)

    # bytes that no longer match their sha256 (the ETag) are refused and not left behind
    stored = store.path(ArtifactStore.relpath_for(ckpts[0].sha256))
    original = stored.read_bytes()
    stored.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        with pytest.raises(robustify.ChecksumMismatchError) as bad:
            sdk.jobs.download(job.id, tmp_path / "bad", epoch=1)
        assert bad.value.code == "checksum_mismatch"
        assert not any((tmp_path / "bad").iterdir())
    finally:
        stored.write_bytes(original)

    queued = sdk.jobs.create(type="evaluate", model_id=model_id, dataset="digits")
    with pytest.raises(robustify.WaitTimeoutError) as slow:
        sdk.jobs.wait(queued.id, timeout=0.3, poll_interval=0.1)
    assert slow.value.last.status == "queued"


class _OnFirstRetry(logging.Handler):
    """Runs `action` when the SDK logs its first retry (so the test needs no sleeps)."""

    def __init__(self, action: Any) -> None:
        super().__init__()
        self.action, self.retries = action, []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("retrying"):
            self.retries.append(record.getMessage())
            if len(self.retries) == 1:
                self.action()


@pytest.fixture
def on_first_retry():
    logger = logging.getLogger("robustify.client")
    handlers: list[_OnFirstRetry] = []

    def install(action: Any) -> _OnFirstRetry:
        handler = _OnFirstRetry(action)
        logger.addHandler(handler)
        handlers.append(handler)
        return handler

    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield install
    for h in handlers:
        logger.removeHandler(h)
    logger.setLevel(old_level)


def test_retries_a_503_until_the_server_recovers(tmp_path, queues, on_first_retry):
    """A server on a database that is not migrated yet answers 503 database_not_migrated; the SDK
    retries with backoff and succeeds once the schema is there."""
    from api.app import create_app

    url = f"sqlite:///{tmp_path / 'late.db'}"
    app = create_app(make_settings(tmp_path, url, queues, auth="off", broker_url=f"sqla+sqlite:///{tmp_path / 'b.db'}"))
    with LiveServer(app) as server:
        with (robustify.Client(server.url, max_retries=0) as impatient,
              pytest.raises(robustify.ServiceUnavailableError) as down):
            impatient.models.list()
        assert down.value.code == "database_not_migrated" and down.value.status == 503

        retried = on_first_retry(lambda: migrations.upgrade(url))
        with robustify.Client(server.url, max_retries=6) as patient:
            assert list(patient.models.list()) == []
    assert retried.retries and "HTTP 503" in retried.retries[0]


def test_retries_when_the_server_is_not_up_yet(app, keys, on_first_retry):
    server = LiveServer(app)  # its port is chosen but nothing listens yet
    with (robustify.Client(server.url, api_key=keys["a"]["key"], max_retries=0) as impatient,
          pytest.raises(robustify.APIConnectionError) as refused):
        impatient.models.list()
    assert refused.value.code == "connection_error" and server.url in str(refused.value)

    retried = on_first_retry(server.__enter__)
    try:
        with robustify.Client(server.url, api_key=keys["a"]["key"], max_retries=6) as patient:
            assert isinstance(patient.models.list(), robustify.Page)
        assert retried.retries and "ConnectError" in retried.retries[0]
    finally:
        server.__exit__(None, None, None)


def test_parse_radius():
    assert robustify.parse_radius("8/255") == pytest.approx(8 / 255)
    assert robustify.parse_radius(" 0.5 ") == 0.5 and robustify.parse_radius(2) == 2.0
    for bad, why in (("eight", "not a radius"), ("1/0", "not a radius"), ("-1/255", "cannot be negative")):
        with pytest.raises(ValueError, match=why):
            robustify.parse_radius(bad)


def test_unknown_fields_are_kept():
    job = robustify.Job.model_validate({"id": "job_1", "status": "running", "future_field": True,
                                        "progress": {"fraction": 0.5, "new_field": 1}})
    assert job.future_field is True and job.progress.fraction == 0.5 and job.progress.new_field == 1
    assert not job.done and robustify.Job.model_validate({"id": "j", "status": "failed"}).done


def test_job_improved_reads_the_result_of_a_finished_fine_tune():
    job = robustify.types.Job.model_validate
    assert job({"id": "job_1", "status": "succeeded", "result": {"improved": True, "best_epoch": 3}}).improved is True
    assert job({"id": "job_2", "status": "succeeded", "result": {"improved": False, "best_epoch": 0}}).improved is False
    assert job({"id": "job_3", "status": "running", "result": None}).improved is None
    assert job({"id": "job_4", "status": "succeeded", "result": {"type": "evaluate"}}).improved is None


# A fine-tune's result in the shapes the engine writes (core/engine/recipes/before_after.py: an accuracy
# beside "<key>_ci95" and "n_examples", per-class rows with the test numbers, the audit's checks, the
# paired change and its interval, the verdict).
FINETUNE_RESULT = {
    "type": "finetune", "improved": False, "verdict": "no_significant_change", "best_epoch": 3,
    "verdict_text": "no significant change: W2 robust accuracy +2.0 points [−1.0, +5.0]",
    "verdict_basis": {"metric": "w2_robust_accuracy", "change": 0.02, "ci95": [-0.01, 0.05], "n": 359,
                      "method": "paired bootstrap over images"},
    "before": {"n_examples": 359, "clean_accuracy": 0.95, "clean_accuracy_ci95": [0.92, 0.97],
               "w2_robust_accuracy": 0.43, "w2_robust_accuracy_ci95": [0.38, 0.48]},
    "after": {"n_examples": 359, "clean_accuracy": {"accuracy": 0.94, "n": 359, "ci95": [0.91, 0.96]},
              "w2_robust_accuracy": 0.45, "w2_robust_accuracy_ci95": [0.40, 0.50],
              "per_class": [{"class": 0, "name": "zero", "n": 36, "clean_accuracy": 1.0,
                             "clean_accuracy_ci95": [0.9, 1.0], "w2_robust_accuracy": 0.5,
                             "w2_robust_accuracy_ci95": [0.34, 0.66]}],
              "confusion_matrix": [[36, 0], [1, 35]]},
    "change": {"w2_robust_accuracy": 0.02, "clean_accuracy": -0.01},
    "change_ci95": {"w2_robust_accuracy": [-0.01, 0.05], "clean_accuracy": [-0.03, 0.01]},
    "audit": [{"check": "radius", "status": "pass", "detail": "robust accuracy falls as δ grows"},
              {"check": "transfer", "status": "warn", "detail": "the transferred attack is as strong"}],
    "provenance": {"evaluation": "standard"},
}


def test_outcome_types_the_intervals_audit_per_class_numbers_and_verdict():
    job = robustify.Job.model_validate({"id": "job_1", "status": "succeeded", "result": FINETUNE_RESULT})
    outcome = job.outcome
    assert isinstance(outcome, robustify.Outcome) and outcome.evaluation == "standard"
    assert outcome.verdict == "no_significant_change" and outcome.verdict_words == FINETUNE_RESULT["verdict_text"]
    assert ((outcome.basis.metric, outcome.basis.ci95, outcome.basis.significant)
            == ("w2_robust_accuracy", (-0.01, 0.05), False))
    assert (outcome.before.w2.accuracy, outcome.before.w2.n, outcome.before.w2.ci95) == (0.43, 359, (0.38, 0.48))
    assert outcome.after.clean == robustify.Accuracy(accuracy=0.94, n=359, ci95=(0.91, 0.96))
    assert str(outcome.after.w2) == "0.450 [0.400, 0.500] (n=359)"
    change = outcome.changes["w2_robust_accuracy"]
    assert (change.change, change.ci95, change.significant) == (0.02, (-0.01, 0.05), False)
    assert outcome.changes["clean_accuracy"].ci95 == (-0.03, 0.01)
    # the engine's own words win; without them the verdict's code is put in words
    coded = robustify.Outcome.model_validate({"verdict": "improved_with_clean_drop"})
    assert coded.verdict_words == "more robust, but the clean accuracy fell by more than the allowed drop"
    assert ([(c.check, c.status, c.passed) for c in outcome.audit]
            == [("radius", "pass", True), ("transfer", "warn", False)])
    assert outcome.audit_status == "warn"
    row = outcome.per_class[0]
    assert (row.label, row.name, row.n, row.w2.accuracy, row.w2.ci95) == (0, "zero", 36, 0.5, (0.34, 0.66))
    assert outcome.confusion_matrix == [[36, 0], [1, 35]] and job.improved is False
    # a result without the newer fields reads as None / empty, and the old verdict follows `improved`
    old = robustify.Job.model_validate({"id": "j", "result": {"improved": False, "after": {"w2_robust_accuracy": 0.5}}})
    assert ((old.outcome.audit, old.outcome.per_class, old.outcome.evaluation, old.outcome.after.w2.ci95)
            == ([], [], None, None))
    assert old.outcome.verdict_words.startswith("not improved") and old.outcome.audit_status is None
    assert robustify.Job.model_validate({"id": "q"}).outcome is None


def test_outcome_reads_an_evaluation_report_per_attack():
    report = {"type": "evaluate", "summary": {"n_examples": 200, "w2_robust_accuracy": 0.3,
                                             "w2_robust_accuracy_ci95": [0.24, 0.37]},
              "config": {"evaluation": "quick"},
              "w2": [{"delta": 0.1, "robust_accuracy": 0.3, "n": 200, "ci95": [0.24, 0.37], "attacks": [
                  {"attack": "w-pgd-redlr", "robust_accuracy": 0.31, "n": 200, "ci95": [0.25, 0.38], "steps": 120,
                   "converged": True},
                  {"attack": "w-pgd-ce", "robust_accuracy": 0.3, "n": 200, "ci95": [0.24, 0.37], "steps": 400,
                   "converged": False}]}]}
    outcome = robustify.Outcome.from_report(report)
    assert outcome.evaluation == "quick" and outcome.summary.w2.ci95 == (0.24, 0.37)
    assert outcome.numbers is outcome.summary
    assert [(a.attack, a.delta, a.steps, a.converged, a.robust_accuracy.accuracy, a.robust_accuracy.ci95)
            for a in outcome.attacks] == [("w-pgd-redlr", 0.1, 120, True, 0.31, (0.25, 0.38)),
                                          ("w-pgd-ce", 0.1, 400, False, 0.3, (0.24, 0.37))]
    assert outcome.verdict_words is None
    # an evaluation job's result: the summary names the preset and the audit's worst status
    job = robustify.Job.model_validate({"id": "job_e", "result": {"type": "evaluate", "summary": {
        "evaluation": "standard", "audit": "fail", "w2_robust_accuracy": 0.9}}})
    assert (job.outcome.evaluation, job.outcome.audit_status, job.outcome.audit) == ("standard", "fail", [])


def test_dataset_census_fields():
    ds = robustify.Dataset.model_validate({
        "id": "ds_1", "class_counts": {"train": [40, 3], "test": [10, 0]},
        "warnings": [{"code": "class_missing", "split": "test", "classes": [1], "message": "no image of class 1"}]})
    assert ds.class_counts["test"] == [10, 0]
    assert [(w.code, w.split, w.classes) for w in ds.warnings] == [("class_missing", "test", [1])]
    assert robustify.Dataset.model_validate({"id": "ds_2"}).warnings == []


def test_a_data_set_answers_its_census_through_api_sdk_and_cli(sdk, live, keys, tmp_path, capsys):
    from cli.main import main

    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 30 + [2] * 3)               # class 2: 3 images against 40
    y_test = np.array([0] * 10 + [1] * 10)                   # and none in the stored test split
    path = tmp_path / "lopsided.npz"
    np.savez(path, x=rng.integers(0, 256, (len(y), 8, 8), dtype=np.uint8), y=y,
             x_test=rng.integers(0, 256, (len(y_test), 8, 8), dtype=np.uint8), y_test=y_test)
    ds = sdk.datasets.upload(path, name="lopsided")
    assert ds.class_counts == {"train": [40, 30, 3], "test": [10, 10, 0]}
    assert [(w.code, w.split, w.classes) for w in ds.warnings] == [("class_imbalance", "train", [2, 0]),
                                                                   ("class_missing", "test", [2])]
    assert sdk.datasets.get(ds.id).warnings == ds.warnings          # stored, not only answered

    plain = tmp_path / "plain.npz"                               # no stored split: counted as the engine splits it
    plain.write_bytes(npz_bytes(n=50))
    balanced = sdk.datasets.upload(plain)
    assert balanced.class_counts == {"train": [4] * 10, "test": [1] * 10} and balanced.warnings == []

    digits = sdk.datasets.get("digits")
    assert digits.class_counts["test"] == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36] and digits.warnings == []
    assert (digits.num_examples, digits.num_classes, digits.image_shape) == (1797, 10, [1, 8, 8])

    assert main(["datasets", "get", ds.id, "--url", live.url, "--key", keys["a"]["key"]]) == 0
    out = capsys.readouterr().out
    assert "train images per class: 40 30 3" in out and "test images per class: 10 10 0" in out
    assert "warning (class_missing): the test split has no image of class 2" in out
