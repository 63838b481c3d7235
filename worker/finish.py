"""Ending a job: store its report, plot and best checkpoint, register a better model, or record why it failed.

Every write is conditional on this worker still owning the job row (JobHooks.owned_job), so a
worker that was declared lost (and replaced) can never overwrite its successor's work. The
callers retry these writes while the database is unreachable (worker/outage.py).
"""
from __future__ import annotations

import json
import logging
import traceback
from typing import Any

from sqlalchemy import select

from core.errors import ErrorCode, RobustifyError, StorageFull, is_storage_full
from core.service.db import Artifact, Job, Model, utcnow
from core.storage.artifacts import add_artifact_row, artifact_relpath, record_artifact
from worker.claim import add_event
from worker.hooks import METRIC_KEYS, JobHooks, json_safe
from worker.runtime import Runtime

log = logging.getLogger("robustify.worker")


def _store_bytes(s: Any, rt: Runtime, job: Job, kind: str, filename: str, content_type: str,
                 content: bytes) -> Artifact:
    return record_artifact(s, rt.store, kind=kind, filename=filename, content_type=content_type, content=content,
                           owner_key_id=job.owner_key_id, job_id=job.id)


def finish_finetune(rt: Runtime, hooks: JobHooks, result: Any) -> str:
    """Store a fine-tune's report, plot and best checkpoint; succeeded (or cancelled when it stopped)."""
    job_id = hooks.job_id
    report_bytes = json.dumps(json_safe(result.report), indent=2).encode()
    plot = result.plot_png()
    with rt.session() as s:
        job = hooks.owned_job(s)
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
        job.result = json_safe({
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
            # the recipe's verdict in its own words (improved, no significant change, worse, ...)
            verdict = result.verdict.text if result.verdict is not None else (
                f"improved: the best checkpoint is epoch {result.best_epoch}" if result.improved else
                "not improved: the best checkpoint is the input model")
            add_event(s, job_id, "status", f"job succeeded ({verdict})",
                      {"status": "succeeded", "improved": result.improved, "best_epoch": result.best_epoch,
                       "verdict": result.verdict.name if result.verdict is not None else None,
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
    if best is None:  # no checkpoint row to register (not expected): no new model
        job.result = {**(job.result or {}), "model_id": None}
        return
    model = register_finetuned_model(s, job, best)
    job.result = {**(job.result or {}), "model_id": model.id}
    add_event(s, job.id, "model", f"registered the best checkpoint as model {model.id}",
              {"model_id": model.id, "parent_model_id": job.model_id, "checkpoint_id": best.id})


def _input_as_checkpoint(rt: Runtime, s: Any, job: Job, result: Any) -> Artifact:
    """When no epoch beat the input, the best checkpoint is the input model: its uploaded weights
    file itself (the same bytes, so a download is byte-identical to the upload), as epoch 0."""
    model_row = s.get(Model, job.model_id)
    weights = s.get(Artifact, model_row.weights_artifact_id) if model_row and model_row.weights_artifact_id else None
    row = dict(kind="checkpoint", filename=f"{job.id}-epoch0-input.safetensors",
               content_type="application/octet-stream", owner_key_id=job.owner_key_id, job_id=job.id, epoch=0,
               is_best=True, data=json_safe(result.validation["before"]))
    if weights is not None and rt.store.exists(artifact_relpath(weights)):
        return add_artifact_row(s, sha256=weights.sha256, size=weights.size, **row)  # the same stored bytes
    from core.engine.checkpoint import save_weights

    tmp = rt.store.temp_file(".safetensors")   # a model row without its file (not expected): its weights
    try:
        save_weights(result.best_model_state, tmp, metadata={"epoch": "0"})
        return record_artifact(s, rt.store, src_path=tmp, move=True, **row)
    finally:
        tmp.unlink(missing_ok=True)


def finish_evaluate(rt: Runtime, hooks: JobHooks, report: Any) -> str:
    """Store an evaluation's report and plot; succeeded (or cancelled when it stopped)."""
    job_id = hooks.job_id
    report_bytes = json.dumps(json_safe(report.to_dict()), indent=2).encode()
    plot = report.plot_png()
    with rt.session() as s:
        job = hooks.owned_job(s)
        rep = _store_bytes(s, rt, job, "report", "report.json", "application/json", report_bytes)
        plot_row = _store_bytes(s, rt, job, "plot", "report.png", "image/png", plot)
        stopped = bool(getattr(report, "stopped", False))
        # the report's own field names (less the per-radius detail), and where the files are
        job.result = json_safe({"type": "evaluate", "summary": report.summary, "warnings": report.warnings,
                                 "provenance": report.provenance, "report_id": rep.id, "plot_id": plot_row.id,
                                 "stopped": stopped})
        job.finished_at = utcnow()
        job.status = "cancelled" if stopped else "succeeded"
        if not stopped:
            job.progress = {**(job.progress or {}), "fraction": 1.0, "phase": "done", "eta_seconds": 0.0}
            job.latest_metrics = {**(job.latest_metrics or {}),
                                  **{k: v for k, v in report.summary.items() if k in METRIC_KEYS}}
        add_event(s, job_id, "status", f"job {job.status}", {"status": job.status, "summary": job.result["summary"]})
        s.commit()
        return job.status


def error_of(exc: BaseException) -> dict[str, str]:
    """The job's `error` for an exception: its own code, or one that says what to do."""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return {"code": ErrorCode.CUDA_OUT_OF_MEMORY,
                    "message": "the GPU ran out of memory; submit again with a smaller batch_size "
                               "(or eval batch) or on a GPU with more memory."}
    except ImportError:
        pass
    if isinstance(exc, RobustifyError):
        return exc.to_dict()
    if is_storage_full(exc):
        return StorageFull.from_os_error(exc).to_dict()
    return {"code": ErrorCode.INTERNAL_ERROR,
            "message": f"the job failed unexpectedly ({type(exc).__name__}: {exc}); "
                       "the traceback is in the job's events. Report it if it persists."}


def fail_job(rt: Runtime, job_id: str, owner: str, exc: BaseException) -> None:
    """Record the job as failed with `exc`'s error and traceback (if this worker still owns it)."""
    error = error_of(exc)
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
