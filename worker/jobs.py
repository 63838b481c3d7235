"""Running a claimed job: load model and data, call the recipe with hooks, store the results.

Torch and the engine are imported inside the functions, never at module import: the worker's
parent process must not touch CUDA (fork and CUDA do not mix), and the API imports nothing here.
Every write that finishes a job is conditional on this worker still owning the row, so a worker
that was declared lost (and replaced) can never overwrite its successor's work.
"""
from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
import traceback
from typing import Any

from sqlalchemy import select, update

from core.storage.artifacts import Store, add_artifact_row, artifact_relpath, delete_artifact, record_artifact
from core.service.db import Artifact, Dataset, Job, Model, utcnow
from core.errors import RobustifyError, StorageFull, is_storage_full
from core.service.logs import job_context
from core.service.queue import enqueue_job
from worker.claim import add_event, claim_job
from worker.outage import DatabaseUnavailable, is_database_down, retry_while_down
from worker.runtime import Runtime, runtime, shutdown_requested, worker_id

log = logging.getLogger("robustify.worker")

_METRIC_KEYS = ("clean_accuracy", "w2_robust_accuracy", "linf_robust_accuracy", "l2_robust_accuracy",
                "train_loss", "w2_robust_to_clean_ratio", "linf_robust_to_clean_ratio", "delta")
_PROGRESS_KEYS = ("epoch", "total_epochs", "step", "total_steps")


class LostOwnership(Exception):
    """Another worker took the job over (this one was declared lost); stop without writing."""


class HandBack(Exception):
    """The worker is shutting down: the run stopped at a checkpoint and the job goes back to the queue."""

    def __init__(self, job_id: str, *, attempt: int) -> None:
        super().__init__(job_id)
        self.attempt = attempt  # this run's attempt number, given back


class Heartbeat:
    """Refreshes jobs.heartbeat_at every few seconds from a thread; notices cancel and takeover."""

    def __init__(self, rt: Runtime, job_id: str, owner: str) -> None:
        self.rt, self.job_id, self.owner = rt, job_id, owner
        self.cancel_requested = False
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Heartbeat":
        # in a copy of the current context, so the thread's log lines carry the job context too
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._loop,),
                                        name=f"heartbeat-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def beat(self) -> None:
        with self.rt.session() as s:
            res = s.execute(update(Job).where(Job.id == self.job_id, Job.worker_id == self.owner,
                                              Job.status.in_(("running", "cancelling")))
                            .values(heartbeat_at=utcnow()))
            row = s.execute(select(Job.cancel_requested_at, Job.worker_id).where(Job.id == self.job_id)).first()
            s.commit()
        if res.rowcount == 0 and (row is None or row.worker_id != self.owner):
            self.lost = True
        if row is not None and row.cancel_requested_at is not None:
            self.cancel_requested = True

    def try_beat(self) -> None:
        """A beat that a database outage only postpones: the job keeps running meanwhile."""
        try:
            self.beat()
        except Exception as exc:
            if not is_database_down(exc):
                raise
            log.warning("heartbeat of %s postponed: the database is unreachable (%s)", self.job_id,
                        type(exc).__name__)

    def _loop(self) -> None:
        while not self._stop.wait(self.rt.settings.heartbeat_seconds):
            try:
                self.beat()
            except Exception:  # a database hiccup must not kill the job; the next beat retries
                log.exception("heartbeat of %s failed", self.job_id)


class JobHooks:
    """The recipe's hooks (core.engine.hooks.Hooks callables) writing progress, events and checkpoints.

    Progress and events are kept in memory while the database is unreachable and written with the
    next write that gets through; checkpoint rows are retried. The run's attempt is counted with
    its first write (claims that die before the recipe starts, e.g. while loading, cost none)."""

    def __init__(self, rt: Runtime, job: Job, owner: str, heartbeat: Heartbeat, attempt: int | None = None) -> None:
        self.rt, self.job_id, self.owner, self.hb = rt, job.id, owner, heartbeat
        self.owner_key_id = job.owner_key_id
        self.attempt = attempt if attempt is not None else job.attempt + 1
        self.attempt_counted = False
        self.interval = rt.settings.progress_interval_seconds
        self._last_write = 0.0
        self._last_phase: str | None = None
        self._last_stop_check = 0.0
        self._started = time.monotonic()
        self._start_fraction: float | None = None
        self._pending_progress: dict[str, Any] | None = None
        self._pending_metrics: dict[str, float] = {}
        self._pending_events: list[tuple[str, str, dict[str, Any]]] = []
        self._retry_at = 0.0
        self.best_checkpoint_id: str | None = None
        self.last_checkpoint_id: str | None = None

    # ------------------------------------------------------------------ ownership
    def _owned(self, s: Any) -> Job:
        job = s.scalar(select(Job).where(Job.id == self.job_id).with_for_update())
        if job is None or job.worker_id != self.owner:
            raise LostOwnership(self.job_id)
        if not self.attempt_counted:  # the first write of a run that does work counts its attempt
            job.attempt = self.attempt
        return job

    @property
    def handing_back(self) -> bool:
        """The stop came from this worker's shutdown, not from a cancel."""
        return shutdown_requested.is_set() and not self.hb.cancel_requested

    # ------------------------------------------------------------------ progress
    def progress(self, fraction: float, phase: str, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        epoch_done = "clean_accuracy" in metrics and "epoch" in metrics
        retry_due = (self._pending_progress is not None or bool(self._pending_events)) and now >= self._retry_at
        if phase == self._last_phase and now - self._last_write < self.interval and not epoch_done and not retry_due:
            return
        if self._start_fraction is None:
            self._start_fraction, self._started = fraction, now
        eta = None
        gained = fraction - self._start_fraction
        if gained > 1e-3:
            eta = round((now - self._started) * (1.0 - fraction) / gained, 1)
        prog = {"fraction": round(min(max(fraction, 0.0), 1.0), 4), "phase": phase, "eta_seconds": eta,
                **{k: metrics[k] for k in _PROGRESS_KEYS if k in metrics}}
        self._pending_progress = prog
        self._pending_metrics.update({k: float(metrics[k]) for k in _METRIC_KEYS
                                      if isinstance(metrics.get(k), (int, float))})
        if phase != self._last_phase:
            self._pending_events.append(("progress", f"phase: {phase}", prog))
        if epoch_done:
            values = ", ".join(f"{k} {float(metrics[k]):.4f}" for k in _METRIC_KEYS
                               if isinstance(metrics.get(k), (int, float)))
            if metrics["epoch"] == 0:
                log.info("input model (epoch 0) validated: %s", values)
            else:
                log.info("epoch %s/%s done: %s", metrics["epoch"], metrics.get("total_epochs"), values)
            self._pending_events.append(("metrics", f"epoch {metrics['epoch']} metrics",
                                         {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}))
        self._last_write, self._last_phase = now, phase
        self._flush(now)

    def _flush(self, now: float) -> None:
        """Write the pending progress and events in one transaction; keep them if the database is down."""
        try:
            with self.rt.session() as s:
                job = self._owned(s)
                if self._pending_progress is not None:
                    job.progress = self._pending_progress
                job.heartbeat_at = utcnow()
                if self._pending_metrics:
                    job.latest_metrics = {**(job.latest_metrics or {}), **self._pending_metrics}
                for type_, message, data in self._pending_events:
                    add_event(s, self.job_id, type_, message, data, level="warning" if type_ == "warning" else "info")
                s.commit()
        except Exception as exc:
            if not is_database_down(exc):
                raise
            self._retry_at = now + min(self.interval * 2, 5.0)
            log.warning("progress of %s kept for later: the database is unreachable (%s)", self.job_id,
                        type(exc).__name__)
            return
        self.attempt_counted = True
        self._pending_progress, self._pending_metrics, self._pending_events = None, {}, []

    # ------------------------------------------------------------------ cancellation
    def should_stop(self) -> bool:
        if self.hb.lost or shutdown_requested.is_set():
            return True
        now = time.monotonic()
        if not self.hb.cancel_requested and now - self._last_stop_check >= 1.0:
            self._last_stop_check = now
            self.hb.try_beat()
            if (self._pending_progress is not None or self._pending_events) and now >= self._retry_at:
                self._flush(now)
        return self.hb.cancel_requested or self.hb.lost

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, ckpt: Any) -> None:
        from core.engine.checkpoint import save_weights

        store: Store = self.rt.store
        partial = "partial" in (ckpt.extra or {})   # stopped inside an epoch
        weights_tmp = store.temp_file(".safetensors")
        state_tmp = store.temp_file(".safetensors")
        try:
            if not partial:  # a stop mid-epoch keeps the last whole epoch as the checkpoint
                save_weights(ckpt.model_state, weights_tmp, metadata={"epoch": str(ckpt.epoch)})
            ckpt.save(state_tmp)
            # Files first (content-addressed, so storing twice is harmless), then the rows: only
            # the database part is retried while the database is unreachable.
            weights = None if partial else store.put_file(weights_tmp, move=True)[:2]
            state = store.put_file(state_tmp, move=True)[:2]
            ckpt_row = retry_while_down(lambda: self._record_checkpoint(ckpt, partial, weights, state),
                                        seconds=self.rt.settings.stale_heartbeat_seconds,
                                        what=f"checkpoint of {self.job_id}")
            self.attempt_counted = True
            if ckpt_row is not None:
                self.last_checkpoint_id = ckpt_row.id
                if ckpt.is_best:
                    self.best_checkpoint_id = ckpt_row.id
        finally:
            weights_tmp.unlink(missing_ok=True)
            state_tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ events
    def event(self, type: str, message: str, data: dict[str, Any]) -> None:
        """An event the recipe reports (e.g. a batch halved after a CUDA out-of-memory error); written
        with the pending progress, and kept for later like it while the database is unreachable."""
        self._pending_events.append((type, message, _json_safe(data)))
        self._flush(time.monotonic())

    def _record_checkpoint(self, ckpt: Any, partial: bool, weights: tuple[str, int] | None,
                           state: tuple[str, int]) -> Artifact | None:
        store: Store = self.rt.store
        with self.rt.session() as s:
            job = self._owned(s)
            ckpt_row = None
            if weights is not None:
                ckpt_row = add_artifact_row(
                    s, sha256=weights[0], size=weights[1], kind="checkpoint",
                    filename=f"{self.job_id}-epoch{ckpt.epoch}.safetensors",
                    content_type="application/octet-stream", owner_key_id=self.owner_key_id,
                    job_id=self.job_id, epoch=ckpt.epoch, is_best=bool(ckpt.is_best), data=_json_safe(ckpt.metrics))
            state_row = add_artifact_row(
                s, sha256=state[0], size=state[1], kind="training_state",
                filename=f"{self.job_id}-training-state.safetensors",
                content_type="application/octet-stream", owner_key_id=self.owner_key_id,
                job_id=self.job_id, epoch=ckpt.epoch, data={"partial": partial})
            previous_state = s.get(Artifact, job.resume_artifact_id) if job.resume_artifact_id else None
            job.resume_artifact_id = state_row.id
            job.heartbeat_at = utcnow()
            data: dict[str, Any] = {"epoch": ckpt.epoch, "total_epochs": ckpt.total_epochs,
                                    "training_state_id": state_row.id, "partial": partial}
            if ckpt_row is not None:
                data.update(checkpoint_id=ckpt_row.id, is_best=bool(ckpt.is_best), sha256=ckpt_row.sha256)
            add_event(s, self.job_id, "checkpoint",
                      f"checkpoint after epoch {ckpt.epoch}" + (" (best so far)" if ckpt.is_best else ""), data)
            if previous_state is not None and previous_state.id != state_row.id:
                delete_artifact(s, store, previous_state)  # commits; only the newest state is needed
            else:
                s.commit()
            return ckpt_row

    def warn(self, message: str, data: dict[str, Any]) -> None:
        """A warning the result will list too (e.g. too few optimizer steps per epoch), as an event now."""
        self.event("warning", message, data)

    def as_hooks(self) -> Any:
        from core.engine.hooks import Hooks

        return Hooks(progress=self.progress, should_stop=self.should_stop, checkpoint=self.checkpoint,
                     event=self.event, warn=self.warn)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: float(o) if hasattr(o, "__float__") else str(o)))


# ---------------------------------------------------------------------- loading inputs
def _input_size(model_row: Model) -> list[int]:
    return list(model_row.input_shape or [3, 32, 32])


def load_model_for(rt: Runtime, session: Any, model_row: Model) -> Any:
    """The nn.Module of a model row, taking [0, 1] pixels: its stored safetensors weights (an
    upload, a fine-tune's result, or a validated RobustBench or Hub model), the RobustBench zoo,
    or the Hugging Face Hub cache (a Hub model before its validation stored the weights)."""
    from core.engine import zoo

    shape = _input_size(model_row)
    if model_row.weights_artifact_id:
        art = session.get(Artifact, model_row.weights_artifact_id)
        if art is None:
            raise RobustifyError(f"the weights of model {model_row.id} are missing; register the model again.",
                                 code="invalid_model_file")
        path = rt.store.local_path(artifact_relpath(art))  # a verified local copy with object storage
        # errors name the user's file, not the content-addressed store path
        label = art.filename or model_row.name
        if model_row.name and model_row.name != label:
            label += f" (model {model_row.name!r})"
        return zoo.load_model_file(path, model_row.architecture, num_classes=model_row.num_classes,
                                   in_channels=shape[0], image_size=(shape[1], shape[2]), dataset=model_row.dataset,
                                   threat_model=model_row.threat_model or "Linf", label=label,
                                   input_mean=model_row.input_mean, input_std=model_row.input_std)
    if model_row.source == "hf-hub":
        return _load_hub_model(rt, model_row)
    name = model_row.architecture.removeprefix("robustbench:")
    return zoo.load_robustbench_model(name, dataset=model_row.dataset, threat_model=model_row.threat_model or "Linf",
                                      model_dir=rt.settings.resolved_model_dir,
                                      allow_download=rt.settings.allow_download)


def load_data_for(rt: Runtime, session: Any, dataset: str) -> Any:
    """A built-in data set, or an uploaded one (an .npz, or an image folder stored as one, with
    its own test split and class names)."""
    from core.engine.data import datasets as data

    if dataset.startswith("ds_"):
        row = session.get(Dataset, dataset)
        art = session.get(Artifact, row.artifact_id) if row is not None and row.artifact_id else None
        if art is None:
            raise RobustifyError(f"uploaded data set {dataset} is missing its file; upload it again.",
                                 code="dataset_unavailable")
        return data.load_npz(rt.store.local_path(artifact_relpath(art)), name=row.name)
    return data.load_dataset(dataset, data_dir=rt.settings.resolved_datasets_dir,
                             allow_download=rt.settings.allow_download)


# ---------------------------------------------------------------------- the task body
def run_job(job_id: str) -> str:
    """Claim, run and finish one job; returns a short word for the log. Never raises for job errors;
    raises DatabaseUnavailable when the database stays unreachable (the task requeues its message).
    A BaseException (SystemExit, KeyboardInterrupt) stops this process, not the job: it is not
    recorded as a failure, the message comes back (reject_on_worker_lost) and the job resumes from
    its last checkpoint."""
    rt = runtime()
    owner = worker_id()
    try:
        claim = retry_while_down(lambda: claim_job(rt, job_id, owner), seconds=rt.settings.stale_heartbeat_seconds,
                                 what=f"claim of job {job_id}")
    except Exception as exc:
        if is_database_down(exc):
            raise DatabaseUnavailable(f"job {job_id} could not be read: {type(exc).__name__}") from exc
        raise
    if not claim.run:
        log.info("job %s not run: %s", job_id, claim.reason)
        return claim.reason
    hb = Heartbeat(rt, job_id, owner)
    with job_context(job_id, claim.attempt, owner), hb:
        log.info("job %s claimed by %s (attempt %d)", job_id, owner, claim.attempt)
        try:
            outcome = _execute(rt, job_id, owner, hb, claim.resume_artifact_id)
            log.info("job %s %s", job_id, outcome)
            return outcome
        except LostOwnership:
            log.warning("job %s: another worker took it over; this run stops without writing", job_id)
            return "lost"
        except HandBack as back:
            _hand_back(rt, job_id, owner, back.attempt)
            return "handed back"
        except Exception as exc:  # noqa: BLE001 - every failure of the job must end in a recorded state
            if is_database_down(exc):
                # Not the job's fault: its message goes back to the queue and the job resumes from its
                # last checkpoint once the database answers (this process may claim it again).
                raise DatabaseUnavailable(f"job {job_id} stopped: the database is unreachable") from exc
            _fail(rt, job_id, owner, exc)
            return "failed"


def _stop_unless_done(hooks: JobHooks, stopped: bool) -> None:
    """After the recipe returned: stop if another worker took over, hand back if this worker is
    shutting down (the recipe stopped at a checkpoint); else the job is finished as usual."""
    if hooks.hb.lost:
        raise LostOwnership(hooks.job_id)
    if stopped and hooks.handing_back:
        raise HandBack(hooks.job_id, attempt=hooks.attempt)


def _hand_back(rt: Runtime, job_id: str, owner: str, attempt: int) -> None:
    """Queue the job again for another worker; this run's attempt is given back (it was cut short
    by a shutdown, not by the job)."""
    from worker.celery_app import app

    def write() -> bool:
        with rt.session() as s:
            job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
            if job is None or job.worker_id != owner or job.status not in ("running", "cancelling"):
                return False
            job.status, job.worker_id, job.heartbeat_at = "queued", None, None
            job.attempt = min(job.attempt, attempt - 1)
            add_event(s, job_id, "status", f"job handed back: its worker {owner} is shutting down; the next "
                                           "worker resumes it from its last checkpoint",
                      {"status": "queued", "reason": "handed_back", "previous_worker": owner})
            s.commit()
            return True

    if retry_while_down(write, seconds=rt.settings.stale_heartbeat_seconds, what=f"hand-back of {job_id}"):
        try:
            enqueue_job(app, job_id)
        except Exception:  # the broker is down: the recovery sweep re-sends queued jobs
            log.exception("job %s handed back but not re-enqueued; the recovery sweep will send it", job_id)
        log.info("job %s handed back to the queue", job_id)


def _execute(rt: Runtime, job_id: str, owner: str, hb: Heartbeat, resume_artifact_id: str | None) -> str:
    import torch

    from core.engine.config import EvaluateConfig, FinetuneConfig
    from worker.ddp import devices_for, run_distributed

    with rt.session() as s:
        job = s.get(Job, job_id)
        devices = devices_for(rt.settings, job.type, job.config) if job is not None else 1
    if devices > 1:  # one process per device, started and supervised from here
        return run_distributed(rt, job_id, owner, hb, devices, resume_artifact_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with rt.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        model_row = s.get(Model, job.model_id)
        if model_row is None:
            raise RobustifyError(f"model {job.model_id} no longer exists", code="validation_error")
        model = load_model_for(rt, s, model_row)
        data = load_data_for(rt, s, job.dataset)
        hooks = JobHooks(rt, job, owner, hb)
        resume = None
        if job.type == "finetune" and resume_artifact_id:
            resume = _load_resume(rt, s, job_id, resume_artifact_id, hooks)
        job_type, config_json = job.type, job.config
        context = _provenance_context(s, job, model_row)

    if job_type == "finetune":
        from core.engine.recipes.finetune import finetune

        result = finetune(FinetuneConfig.model_validate(config_json), model, data, hooks.as_hooks(),
                          device=device, resume=resume, context=context)
        _stop_unless_done(hooks, result.stopped)
        return retry_while_down(lambda: _finish_finetune(rt, job_id, owner, hooks, result),
                                seconds=rt.settings.stale_heartbeat_seconds, what=f"finishing job {job_id}")
    from core.engine.recipes.evaluate import evaluate

    report = evaluate(EvaluateConfig.model_validate(config_json), model, data, hooks.as_hooks(), device=device,
                      context=context)
    _stop_unless_done(hooks, report.stopped)
    return retry_while_down(lambda: _finish_evaluate(rt, job_id, owner, hooks, report),
                            seconds=rt.settings.stale_heartbeat_seconds, what=f"finishing job {job_id}")


def _provenance_context(s: Any, job: Job, model_row: Model) -> dict[str, Any]:
    """The ids a report names, and the sha256 of the weights the job started from."""
    weights = s.get(Artifact, model_row.weights_artifact_id) if model_row.weights_artifact_id else None
    return {"job_id": job.id, "model_id": model_row.id, "dataset": job.dataset,
            "model_sha256": weights.sha256 if weights is not None else None}


def _load_resume(rt: Runtime, s: Any, job_id: str, artifact_id: str, hooks: JobHooks) -> Any:
    from core.engine.checkpoint import load_training_checkpoint

    art = s.get(Artifact, artifact_id)
    if art is None:
        return None
    ckpt = load_training_checkpoint(rt.store.local_path(artifact_relpath(art)))
    best = s.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "checkpoint",
                                           Artifact.is_best.is_(True))
                    .order_by(Artifact.created_at.desc(), Artifact.id.desc()).limit(1))
    hooks.best_checkpoint_id = best.id if best is not None else None
    add_event(s, job_id, "status", f"resuming from the checkpoint after epoch {ckpt.epoch}",
              {"resumed_from_epoch": ckpt.epoch, "training_state_id": artifact_id})
    s.commit()
    return ckpt


def _store_bytes(s: Any, rt: Runtime, job: Job, kind: str, filename: str, content_type: str, content: bytes) -> Artifact:
    return record_artifact(s, rt.store, kind=kind, filename=filename, content_type=content_type, content=content,
                           owner_key_id=job.owner_key_id, job_id=job.id)


def _finish_finetune(rt: Runtime, job_id: str, owner: str, hooks: JobHooks, result: Any) -> str:
    report_bytes = json.dumps(_json_safe(result.report), indent=2).encode()
    plot = result.plot_png()
    with rt.session() as s:
        job = hooks._owned(s)
        now = utcnow()
        if result.best_epoch > 0:
            best = s.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "checkpoint",
                                                   Artifact.epoch == result.best_epoch)
                            .order_by(Artifact.created_at.desc(), Artifact.id.desc()).limit(1))
        else:
            best = _input_as_checkpoint(rt, s, job, result)
        # exactly one checkpoint is "the best" once the run is over
        for art in s.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "checkpoint")):
            art.is_best = best is not None and art.id == best.id
        report = _store_bytes(s, rt, job, "report", "report.json", "application/json", report_bytes)
        plot_row = _store_bytes(s, rt, job, "plot", "report.png", "image/png", plot)
        # the report's own field names (less the per-epoch history), and where the files are
        job.result = _json_safe({
            **result.summary, "best_checkpoint_id": best.id if best else None,
            "best_checkpoint_sha256": best.sha256 if best else None,
            "report_id": report.id, "plot_id": plot_row.id,
        })
        job.finished_at = now
        if result.stopped:
            job.status = "cancelled"
            add_event(s, job_id, "status", f"job cancelled after epoch {result.epochs_completed}; checkpoints kept",
                      {"status": "cancelled", "last_checkpoint_id": hooks.last_checkpoint_id})
        else:
            job.status = "succeeded"
            job.progress = {**(job.progress or {}), "fraction": 1.0, "phase": "done", "eta_seconds": 0.0}
            _chain(s, rt, job, best, result.improved)
            verdict = (f"improved: the best checkpoint is epoch {result.best_epoch}" if result.improved else
                       "not improved: no fine-tuned epoch beat the input model; the best checkpoint is the input model")
            add_event(s, job_id, "status", f"job succeeded ({verdict})",
                      {"status": "succeeded", "improved": result.improved, "best_epoch": result.best_epoch,
                       "best_checkpoint_id": job.result["best_checkpoint_id"], "model_id": job.result.get("model_id"),
                       "before": job.result["before"], "after": job.result["after"]})
        s.commit()
        return job.status


def _chain(s: Any, rt: Runtime, job: Job, best: Artifact | None, improved: bool) -> None:
    """result.model_id: the model a next job can use. An improved fine-tune registers its best
    checkpoint as a new model (worker/chain.py); one that did not improve hands back the input
    model itself, so its id is the input's and nothing new is registered."""
    from worker.chain import register_finetuned_model

    if not improved:
        job.result = {**(job.result or {}), "model_id": job.model_id}
        return
    model = register_finetuned_model(s, job, best) if best is not None else None
    job.result = {**(job.result or {}), "model_id": model.id if model else None}
    if model is not None:
        add_event(s, job.id, "model", f"registered the best checkpoint as model {model.id}",
                  {"model_id": model.id, "parent_model_id": job.model_id, "checkpoint_id": best.id})


def _input_as_checkpoint(rt: Runtime, s: Any, job: Job, result: Any) -> Artifact:
    """When no epoch beat the input, the best checkpoint is the input model: its uploaded weights
    file itself (the same bytes, so a download is byte-identical to the upload), as epoch 0."""
    model_row = s.get(Model, job.model_id)
    weights = s.get(Artifact, model_row.weights_artifact_id) if model_row and model_row.weights_artifact_id else None
    row = dict(kind="checkpoint", filename=f"{job.id}-epoch0-input.safetensors",
               content_type="application/octet-stream", owner_key_id=job.owner_key_id, job_id=job.id, epoch=0,
               is_best=True, data=_json_safe(result.validation["before"]))
    if weights is not None and rt.store.exists(artifact_relpath(weights)):
        return add_artifact_row(s, sha256=weights.sha256, size=weights.size, **row)  # the same stored bytes
    from core.engine.checkpoint import save_weights

    tmp = rt.store.temp_file(".safetensors")   # a model row without its file (not expected): its weights
    try:
        save_weights(result.best_model_state, tmp, metadata={"epoch": "0"})
        return record_artifact(s, rt.store, src_path=tmp, move=True, **row)
    finally:
        tmp.unlink(missing_ok=True)


def _finish_evaluate(rt: Runtime, job_id: str, owner: str, hooks: JobHooks, report: Any) -> str:
    report_bytes = json.dumps(_json_safe(report.to_dict()), indent=2).encode()
    plot = report.plot_png()
    with rt.session() as s:
        job = hooks._owned(s)
        rep = _store_bytes(s, rt, job, "report", "report.json", "application/json", report_bytes)
        plot_row = _store_bytes(s, rt, job, "plot", "report.png", "image/png", plot)
        stopped = bool(getattr(report, "stopped", False))
        # the report's own field names (less the per-radius detail), and where the files are
        job.result = _json_safe({"type": "evaluate", "summary": report.summary, "warnings": report.warnings,
                                 "provenance": report.provenance, "report_id": rep.id, "plot_id": plot_row.id,
                                 "stopped": stopped})
        job.finished_at = utcnow()
        job.status = "cancelled" if stopped else "succeeded"
        if not stopped:
            job.progress = {**(job.progress or {}), "fraction": 1.0, "phase": "done", "eta_seconds": 0.0}
            job.latest_metrics = {**(job.latest_metrics or {}),
                                  **{k: v for k, v in report.summary.items() if k in _METRIC_KEYS}}
        add_event(s, job_id, "status", f"job {job.status}", {"status": job.status, "summary": job.result["summary"]})
        s.commit()
        return job.status


def _error_of(exc: BaseException) -> dict[str, str]:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return {"code": "cuda_out_of_memory",
                    "message": "the GPU ran out of memory; submit again with a smaller batch_size "
                               "(or eval batch) or on a GPU with more memory."}
    except ImportError:
        pass
    if isinstance(exc, RobustifyError):
        return exc.to_dict()
    if is_storage_full(exc):
        return StorageFull.from_os_error(exc).to_dict()  # type: ignore[arg-type]
    return {"code": "internal_error",
            "message": f"the job failed unexpectedly ({type(exc).__name__}: {exc}); "
                       "the traceback is in the job's events. Report it if it persists."}


def _fail(rt: Runtime, job_id: str, owner: str, exc: BaseException) -> None:
    error = _error_of(exc)
    tb = "".join(traceback.format_exception(exc))
    log.error("job %s failed: %s", job_id, tb)
    try:
        with rt.session() as s:
            job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
            if job is None or job.worker_id != owner:
                return
            job.status, job.error, job.finished_at = "failed", error, utcnow()
            add_event(s, job_id, "status", f"job failed: {error['code']}", {"status": "failed", "error": error},
                      level="error")
            add_event(s, job_id, "log", "traceback", {"traceback": tb[-20000:]}, level="error")
            s.commit()
    except Exception:
        log.exception("could not record the failure of job %s", job_id)


# ---------------------------------------------------------------------- model validation
def validate_model(model_id: str) -> str:
    """Check an uploaded or RobustBench model: ready, or rejected with the reason (upload deleted).
    Raises DatabaseUnavailable when the database is unreachable (the task requeues its message)."""
    rt = runtime()
    try:
        return retry_while_down(lambda: _validate_model(rt, model_id), seconds=rt.settings.stale_heartbeat_seconds,
                                what=f"validation of model {model_id}")
    except Exception as exc:
        if is_database_down(exc):
            raise DatabaseUnavailable(f"model {model_id} could not be read: {type(exc).__name__}") from exc
        raise


def _validate_model(rt: Runtime, model_id: str) -> str:
    with rt.session() as s:
        m = s.get(Model, model_id)
        if m is None or m.status != "validating":
            return "skipped"
        try:
            model = load_model_for(rt, s, m)
            _forward_check(model, m)
            if m.weights_artifact_id is None:  # RobustBench, Hub: keep its weights as safetensors
                m.weights_artifact_id = _store_state_dict(rt, s, m, model).id
            if m.input_mean is None:  # RobustBench models normalise inside: identity
                m.input_mean, m.input_std = [0.0] * _input_size(m)[0], [1.0] * _input_size(m)[0]
            m.status, m.error = "ready", None
            s.commit()
            return "ready"
        except Exception as exc:  # noqa: BLE001 - any failure rejects the model with a reason
            if is_database_down(exc):
                raise  # not the model's fault: validated again once the database answers
            s.rollback()
            m = s.get(Model, model_id)
            if isinstance(exc, RobustifyError):
                error = exc.to_dict()
            else:
                error = {"code": "invalid_model_file",
                         "message": f"the model could not be loaded ({type(exc).__name__}: {exc}); check that the "
                                    "state dict matches the architecture, class count and input shape."}
            log.info("model %s rejected: %s", model_id, error)
            m.status, m.error = "rejected", error
            weights = s.get(Artifact, m.weights_artifact_id) if m.weights_artifact_id else None
            m.weights_artifact_id = None
            if weights is not None and m.source == "upload":
                delete_artifact(s, rt.store, weights)  # commits; nothing of a rejected upload is kept
            else:
                s.commit()
            return "rejected"


def _load_hub_model(rt: Runtime, m: Model) -> Any:
    """Load a Hub model and write on its row what the hub's config fixed: the timm architecture
    (once validation has stored the weights, they load like an upload's; the model's name stays
    the repository id) and the input size, mean and std the registration left to it."""
    from core.engine.hub import load_hub_model, parse_hub_architecture

    repo, revision = parse_hub_architecture(m.architecture)
    model, resolved = load_hub_model(repo, revision=revision, num_classes=m.num_classes, input_size=m.input_shape,
                                     input_mean=m.input_mean, input_std=m.input_std, dataset=m.dataset,
                                     allow_download=rt.settings.allow_download)
    m.architecture, m.input_shape = resolved.architecture, resolved.input_size
    m.input_mean, m.input_std = resolved.mean, resolved.std
    return model


def _forward_check(model: Any, m: Model) -> None:
    import torch

    shape = _input_size(m)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    if tuple(out.shape) != (2, m.num_classes):
        raise RobustifyError(f"the model outputs shape {tuple(out.shape)} for input {shape}, expected "
                             f"(batch, {m.num_classes}); check num_classes and input_shape.",
                             code="invalid_model_file")


def _store_state_dict(rt: Runtime, s: Any, m: Model, model: Any) -> Artifact:
    from core.engine.checkpoint import save_weights

    tmp = rt.store.temp_file(".safetensors")
    try:
        save_weights(model.state_dict(), tmp)
        return record_artifact(s, rt.store, kind="model_weights", src_path=tmp, move=True,
                               filename=f"{m.name.replace('/', '--')}.safetensors",
                               content_type="application/octet-stream",
                               owner_key_id=m.owner_key_id)
    finally:
        tmp.unlink(missing_ok=True)
