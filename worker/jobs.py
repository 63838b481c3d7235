"""Running a claimed job: load model and data, call the recipe with hooks, store the results.

Torch and the engine are imported inside the functions, never at module import: the worker's
parent process must not touch CUDA (fork and CUDA do not mix), and the API imports nothing here.
Every write that finishes a job is conditional on this worker still owning the row, so a worker
that was declared lost (and replaced) can never overwrite its successor's work.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from typing import Any

from sqlalchemy import select, update

from core.artifacts import ArtifactStore, delete_artifact, record_artifact
from core.db import Artifact, Dataset, Job, Model, utcnow
from core.errors import RobustifyError
from worker.claim import add_event, claim_job
from worker.runtime import Runtime, runtime, worker_id

log = logging.getLogger("robustify.worker")

_METRIC_KEYS = ("clean_accuracy", "w2_robust_accuracy", "linf_robust_accuracy", "l2_robust_accuracy",
                "train_loss", "w2_robust_to_clean_ratio", "linf_robust_to_clean_ratio", "delta")
_PROGRESS_KEYS = ("epoch", "total_epochs", "step", "total_steps")


class LostOwnership(Exception):
    """Another worker took the job over (this one was declared lost); stop without writing."""


class Heartbeat:
    """Refreshes jobs.heartbeat_at every few seconds from a thread; notices cancel and takeover."""

    def __init__(self, rt: Runtime, job_id: str, owner: str) -> None:
        self.rt, self.job_id, self.owner = rt, job_id, owner
        self.cancel_requested = False
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
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

    def _loop(self) -> None:
        while not self._stop.wait(self.rt.settings.heartbeat_seconds):
            try:
                self.beat()
            except Exception:  # a database hiccup must not kill the job; the next beat retries
                log.exception("heartbeat of %s failed", self.job_id)


class JobHooks:
    """The recipe's hooks (core.hooks.Hooks callables) writing progress, events and checkpoints."""

    def __init__(self, rt: Runtime, job: Job, owner: str, heartbeat: Heartbeat) -> None:
        self.rt, self.job_id, self.owner, self.hb = rt, job.id, owner, heartbeat
        self.owner_key_id = job.owner_key_id
        self.interval = rt.settings.progress_interval_seconds
        self._last_write = 0.0
        self._last_phase: str | None = None
        self._last_stop_check = 0.0
        self._started = time.monotonic()
        self._start_fraction: float | None = None
        self.best_checkpoint_id: str | None = None
        self.last_checkpoint_id: str | None = None

    # ------------------------------------------------------------------ ownership
    def _owned(self, s: Any) -> Job:
        job = s.scalar(select(Job).where(Job.id == self.job_id).with_for_update())
        if job is None or job.worker_id != self.owner:
            raise LostOwnership(self.job_id)
        return job

    # ------------------------------------------------------------------ progress
    def progress(self, fraction: float, phase: str, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        epoch_done = "clean_accuracy" in metrics and "epoch" in metrics
        if phase == self._last_phase and now - self._last_write < self.interval and not epoch_done:
            return
        if self._start_fraction is None:
            self._start_fraction, self._started = fraction, now
        eta = None
        gained = fraction - self._start_fraction
        if gained > 1e-3:
            eta = round((now - self._started) * (1.0 - fraction) / gained, 1)
        prog = {"fraction": round(min(max(fraction, 0.0), 1.0), 4), "phase": phase, "eta_seconds": eta,
                **{k: metrics[k] for k in _PROGRESS_KEYS if k in metrics}}
        latest = {k: float(metrics[k]) for k in _METRIC_KEYS if isinstance(metrics.get(k), (int, float))}
        with self.rt.session() as s:
            job = self._owned(s)
            job.progress = prog
            job.heartbeat_at = utcnow()
            if latest:
                job.latest_metrics = {**(job.latest_metrics or {}), **latest}
            if phase != self._last_phase:
                add_event(s, self.job_id, "progress", f"phase: {phase}", prog)
            if epoch_done:
                add_event(s, self.job_id, "metrics", f"epoch {metrics['epoch']} metrics",
                          {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
            s.commit()
        self._last_write, self._last_phase = now, phase

    # ------------------------------------------------------------------ cancellation
    def should_stop(self) -> bool:
        if self.hb.lost:
            return True
        now = time.monotonic()
        if not self.hb.cancel_requested and now - self._last_stop_check >= 1.0:
            self._last_stop_check = now
            self.hb.beat()
        return self.hb.cancel_requested or self.hb.lost

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, ckpt: Any) -> None:
        from core.checkpoint import save_weights

        store: ArtifactStore = self.rt.store
        partial = "partial" in (ckpt.extra or {})   # stopped inside an epoch
        weights_tmp = store.temp_file(".safetensors")
        state_tmp = store.temp_file(".safetensors")
        try:
            if not partial:  # a stop mid-epoch keeps the last whole epoch as the checkpoint
                save_weights(ckpt.model_state, weights_tmp, metadata={"epoch": str(ckpt.epoch)})
            ckpt.save(state_tmp)
            with self.rt.session() as s:
                job = self._owned(s)
                metrics = _json_safe(ckpt.metrics)
                ckpt_row = None
                if not partial:
                    ckpt_row = record_artifact(
                        s, store, kind="checkpoint", src_path=weights_tmp, move=True,
                        filename=f"{self.job_id}-epoch{ckpt.epoch}.safetensors",
                        content_type="application/octet-stream", owner_key_id=self.owner_key_id,
                        job_id=self.job_id, epoch=ckpt.epoch, is_best=bool(ckpt.is_best), data=metrics)
                state_row = record_artifact(
                    s, store, kind="training_state", src_path=state_tmp, move=True,
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
            if ckpt_row is not None:
                self.last_checkpoint_id = ckpt_row.id
                if ckpt.is_best:
                    self.best_checkpoint_id = ckpt_row.id
        finally:
            weights_tmp.unlink(missing_ok=True)
            state_tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ warnings
    def warn(self, message: str, data: dict[str, Any]) -> None:
        with self.rt.session() as s:
            self._owned(s)
            add_event(s, self.job_id, "warning", message, _json_safe(data), level="warning")
            s.commit()

    def as_hooks(self) -> Any:
        from core.hooks import Hooks

        return Hooks(progress=self.progress, should_stop=self.should_stop, checkpoint=self.checkpoint,
                     warn=self.warn)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: float(o) if hasattr(o, "__float__") else str(o)))


# ---------------------------------------------------------------------- loading inputs
def load_model_for(rt: Runtime, session: Any, model_row: Model) -> Any:
    """The nn.Module of a model row: its stored safetensors weights, or the RobustBench zoo."""
    from core import zoo

    shape = list(model_row.input_shape or [3, 32, 32])
    if model_row.weights_artifact_id:
        art = session.get(Artifact, model_row.weights_artifact_id)
        if art is None:
            raise RobustifyError(f"the weights of model {model_row.id} are missing; register the model again.",
                                 code="invalid_model_file")
        path = rt.store.path(ArtifactStore.relpath_for(art.sha256))
        # errors name the user's file, not the content-addressed store path
        label = art.filename or model_row.name
        if model_row.name and model_row.name != label:
            label += f" (model {model_row.name!r})"
        return zoo.load_model_file(path, model_row.architecture, num_classes=model_row.num_classes,
                                   in_channels=shape[0], image_size=shape[-1], dataset=model_row.dataset,
                                   threat_model=model_row.threat_model or "Linf", label=label)
    name = model_row.architecture.removeprefix("robustbench:")
    return zoo.load_robustbench_model(name, dataset=model_row.dataset, threat_model=model_row.threat_model or "Linf",
                                      model_dir=rt.settings.resolved_model_dir,
                                      allow_download=rt.settings.allow_download)


def load_data_for(rt: Runtime, session: Any, dataset: str) -> Any:
    from core import data

    if dataset.startswith("ds_"):
        row = session.get(Dataset, dataset)
        art = session.get(Artifact, row.artifact_id) if row is not None and row.artifact_id else None
        if art is None:
            raise RobustifyError(f"uploaded data set {dataset} is missing its file; upload it again.",
                                 code="dataset_unavailable")
        return data.load_npz(rt.store.path(ArtifactStore.relpath_for(art.sha256)))
    return data.load_dataset(dataset, data_dir=rt.settings.resolved_datasets_dir,
                             allow_download=rt.settings.allow_download)


# ---------------------------------------------------------------------- the task body
def run_job(job_id: str) -> str:
    """Claim, run and finish one job; returns a short word for the log. Never raises for job errors."""
    rt = runtime()
    owner = worker_id()
    claim = claim_job(rt, job_id, owner)
    if not claim.run:
        log.info("job %s not run: %s", job_id, claim.reason)
        return claim.reason
    log.info("job %s claimed by %s (attempt %d)", job_id, owner, claim.attempt)
    hb = Heartbeat(rt, job_id, owner)
    with hb:
        try:
            return _execute(rt, job_id, owner, hb, claim.resume_artifact_id)
        except LostOwnership:
            log.warning("job %s: another worker took it over; this run stops without writing", job_id)
            return "lost"
        except BaseException as exc:  # noqa: BLE001 - every failure must end in a recorded state
            _fail(rt, job_id, owner, exc)
            if not isinstance(exc, Exception):
                raise
            return "failed"


def _execute(rt: Runtime, job_id: str, owner: str, hb: Heartbeat, resume_artifact_id: str | None) -> str:
    import torch

    from core.config import EvaluateConfig, FinetuneConfig

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
        from core.recipes.finetune import finetune

        result = finetune(FinetuneConfig.model_validate(config_json), model, data, hooks.as_hooks(),
                          device=device, resume=resume, context=context)
        if hb.lost:
            raise LostOwnership(job_id)
        return _finish_finetune(rt, job_id, owner, hooks, result)
    from core.recipes.evaluate import evaluate

    report = evaluate(EvaluateConfig.model_validate(config_json), model, data, hooks.as_hooks(), device=device,
                      context=context)
    if hb.lost:
        raise LostOwnership(job_id)
    return _finish_evaluate(rt, job_id, owner, hooks, report)


def _provenance_context(s: Any, job: Job, model_row: Model) -> dict[str, Any]:
    """The ids a report names, and the sha256 of the weights the job started from."""
    weights = s.get(Artifact, model_row.weights_artifact_id) if model_row.weights_artifact_id else None
    return {"job_id": job.id, "model_id": model_row.id, "dataset": job.dataset,
            "model_sha256": weights.sha256 if weights is not None else None}


def _load_resume(rt: Runtime, s: Any, job_id: str, artifact_id: str, hooks: JobHooks) -> Any:
    from core.checkpoint import load_training_checkpoint

    art = s.get(Artifact, artifact_id)
    if art is None:
        return None
    ckpt = load_training_checkpoint(rt.store.path(ArtifactStore.relpath_for(art.sha256)))
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
            verdict = (f"improved: the best checkpoint is epoch {result.best_epoch}" if result.improved else
                       "not improved: no fine-tuned epoch beat the input model; the best checkpoint is the input model")
            add_event(s, job_id, "status", f"job succeeded ({verdict})",
                      {"status": "succeeded", "improved": result.improved, "best_epoch": result.best_epoch,
                       "best_checkpoint_id": job.result["best_checkpoint_id"], "before": job.result["before"],
                       "after": job.result["after"]})
        s.commit()
        return job.status


def _input_as_checkpoint(rt: Runtime, s: Any, job: Job, result: Any) -> Artifact:
    """When no epoch beat the input, the best checkpoint is the input model: its uploaded weights
    file itself (the same bytes, so a download is byte-identical to the upload), as epoch 0."""
    model_row = s.get(Model, job.model_id)
    weights = s.get(Artifact, model_row.weights_artifact_id) if model_row and model_row.weights_artifact_id else None
    row = dict(kind="checkpoint", filename=f"{job.id}-epoch0-input.safetensors",
               content_type="application/octet-stream", owner_key_id=job.owner_key_id, job_id=job.id, epoch=0,
               is_best=True, data=_json_safe(result.validation["before"]))
    stored = ArtifactStore.relpath_for(weights.sha256) if weights is not None else None
    if stored is not None and rt.store.exists(stored):
        return record_artifact(s, rt.store, src_path=rt.store.path(stored), **row)
    from core.checkpoint import save_weights

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
    """Check an uploaded or RobustBench model: ready, or rejected with the reason (upload deleted)."""
    rt = runtime()
    with rt.session() as s:
        m = s.get(Model, model_id)
        if m is None or m.status != "validating":
            return "skipped"
        try:
            model = load_model_for(rt, s, m)
            _forward_check(model, m)
            if m.weights_artifact_id is None:  # RobustBench: keep its weights as safetensors
                m.weights_artifact_id = _store_state_dict(rt, s, m, model).id
            m.status, m.error = "ready", None
            s.commit()
            return "ready"
        except Exception as exc:  # noqa: BLE001 - any failure rejects the model with a reason
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


def _forward_check(model: Any, m: Model) -> None:
    import torch

    shape = list(m.input_shape or [3, 32, 32])
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    if tuple(out.shape) != (2, m.num_classes):
        raise RobustifyError(f"the model outputs shape {tuple(out.shape)} for input {shape}, expected "
                             f"(batch, {m.num_classes}); check num_classes and input_shape.",
                             code="invalid_model_file")


def _store_state_dict(rt: Runtime, s: Any, m: Model, model: Any) -> Artifact:
    from core.checkpoint import save_weights

    tmp = rt.store.temp_file(".safetensors")
    try:
        save_weights(model.state_dict(), tmp)
        return record_artifact(s, rt.store, kind="model_weights", src_path=tmp, move=True,
                               filename=f"{m.name}.safetensors", content_type="application/octet-stream",
                               owner_key_id=m.owner_key_id)
    finally:
        tmp.unlink(missing_ok=True)
