"""A running job's side of the recipe's hooks: progress, events, checkpoints, cancels, ownership.

Every write is conditional on this worker still owning the job row (`JobHooks.owned_job`), so a
worker that was declared lost (and replaced) can never overwrite its successor's work. Progress
and events wait in memory while the database is unreachable; checkpoint rows are retried.
"""
from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
from typing import Any, cast

from sqlalchemy import CursorResult, select, update

from core.engine.hooks import Eta
from core.service.db import Artifact, Job, utcnow
from core.states import WORKER_STATES
from core.storage.artifacts import Store, add_artifact_row, delete_artifact
from worker.claim import add_event
from worker.outage import OutageLog, is_database_down, retry_while_down
from worker.runtime import Runtime, shutdown_requested

log = logging.getLogger("robustify.worker")

# The numbers a job row keeps as latest_metrics (and an evaluation's summary hands on).
METRIC_KEYS = ("clean_accuracy", "w2_robust_accuracy", "linf_robust_accuracy", "l2_robust_accuracy",
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

    def __enter__(self) -> Heartbeat:
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
            # an UPDATE answers with a cursor result, which counts the rows it changed
            res = cast(CursorResult[Any], s.execute(update(Job).where(
                Job.id == self.job_id, Job.worker_id == self.owner, Job.status.in_(WORKER_STATES))
                .values(heartbeat_at=utcnow())))
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
        outage = OutageLog(f"heartbeat of {self.job_id}", log)
        while not self._stop.wait(self.rt.settings.heartbeat_seconds):
            try:
                self.beat()
            except Exception as exc:  # a database hiccup must not kill the job; the next beat retries
                outage.failed(exc)
            else:
                outage.succeeded()


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
        self._eta = Eta()
        self._pending_progress: dict[str, Any] | None = None
        self._pending_metrics: dict[str, float] = {}
        self._pending_events: list[tuple[str, str, dict[str, Any]]] = []
        self._retry_at = 0.0
        self.best_checkpoint_id: str | None = None
        self.last_checkpoint_id: str | None = None

    # ------------------------------------------------------------------ ownership
    def owned_job(self, s: Any) -> Job:
        """The job row, locked for this write; LostOwnership when another worker took it over."""
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
        eta = self._eta(fraction)   # the rate since this run's first report (core.engine.hooks.Eta)
        prog = {"fraction": round(min(max(fraction, 0.0), 1.0), 4), "phase": phase, "eta_seconds": eta,
                **{k: metrics[k] for k in _PROGRESS_KEYS if k in metrics}}
        self._pending_progress = prog
        self._pending_metrics.update({k: float(metrics[k]) for k in METRIC_KEYS
                                      if isinstance(metrics.get(k), (int, float))})
        if phase != self._last_phase:
            self._pending_events.append(("progress", f"phase: {phase}", prog))
        if epoch_done:
            values = ", ".join(f"{k} {float(metrics[k]):.4f}" for k in METRIC_KEYS
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
                job = self.owned_job(s)
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
        self._pending_events.append((type, message, json_safe(data)))
        self._flush(time.monotonic())

    def _record_checkpoint(self, ckpt: Any, partial: bool, weights: tuple[str, int] | None,
                           state: tuple[str, int]) -> Artifact | None:
        store: Store = self.rt.store
        with self.rt.session() as s:
            job = self.owned_job(s)
            ckpt_row = None
            if weights is not None:
                ckpt_row = add_artifact_row(
                    s, sha256=weights[0], size=weights[1], kind="checkpoint",
                    filename=f"{self.job_id}-epoch{ckpt.epoch}.safetensors",
                    content_type="application/octet-stream", owner_key_id=self.owner_key_id,
                    job_id=self.job_id, epoch=ckpt.epoch, is_best=bool(ckpt.is_best), data=json_safe(ckpt.metrics))
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


def json_safe(value: Any) -> Any:
    """`value` as plain JSON (numbers such as tensors' items as floats, anything else as text)."""
    return json.loads(json.dumps(value, default=lambda o: float(o) if hasattr(o, "__float__") else str(o)))
