"""Recovery sweep: the database, not the broker, decides which jobs still need a worker.

A SIGKILLed worker leaves its message unacknowledged until the broker's visibility timeout
(days, by design: jobs are long), so every worker re-enqueues, at start and every
ROBUSTIFY_SWEEP_SECONDS, the jobs whose owner is gone (`running`/`cancelling` with a stale
heartbeat or a dead local process) and `queued` jobs that waited longer than
ROBUSTIFY_QUEUED_REQUEUE_SECONDS (their message may be lost). A duplicate message is harmless:
the claim refuses it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from core.service.db import Job, as_utc, record_worker_heartbeat, utcnow
from core.states import LIVE_STATES, PARENT_TYPES
from worker.runtime import Runtime, heartbeat_is_stale, runtime

log = logging.getLogger("robustify.worker")


class Sweeper:
    def __init__(self, rt: Runtime, enqueue: Callable[[str], None]) -> None:
        self.rt = rt
        self.enqueue = enqueue
        self.queued_after = rt.settings.queued_requeue_seconds
        # A queued job waiting behind long jobs is re-sent at most this often (not every sweep).
        self.resend_every = max(self.queued_after, rt.settings.queued_resend_seconds)
        self._sent: dict[str, float] = {}

    def sweep(self) -> list[str]:
        """Re-enqueue the jobs that need a worker; returns their ids."""
        settings = self.rt.settings
        now = utcnow()
        mono = time.monotonic()
        due: list[str] = []
        with self.rt.session() as s:
            rows = s.execute(select(Job.id, Job.status, Job.heartbeat_at, Job.worker_id, Job.created_at, Job.type)
                             .where(Job.status.in_(LIVE_STATES))).all()
            # a sweep has no worker: it is re-sent (to be settled) only once none of its children is live
            parents = [r.id for r in rows if r.type in PARENT_TYPES]
            waiting = set(s.scalars(select(Job.parent_job_id).where(
                Job.parent_job_id.in_(parents), Job.status.in_(LIVE_STATES)))) if parents else set()
        for row in rows:
            if row.id in waiting:
                continue
            if row.status == "queued":
                waited = now - (as_utc(row.created_at) or now)
                if waited < timedelta(seconds=self.queued_after):
                    continue
                if mono - self._sent.get(row.id, -1e18) < self.resend_every:
                    continue
            elif not heartbeat_is_stale(row.heartbeat_at, row.worker_id, settings):
                continue
            elif mono - self._sent.get(row.id, -1e18) < settings.stale_heartbeat_seconds:
                continue  # sent recently; give the claim time to take it
            due.append(row.id)
        for job_id in due:
            try:
                self.enqueue(job_id)
                self._sent[job_id] = mono
                log.warning("recovery sweep: re-enqueued job %s", job_id)
            except Exception:
                log.exception("recovery sweep: could not re-enqueue %s", job_id)
        live = {r.id for r in rows}
        self._sent = {k: v for k, v in self._sent.items() if k in live}
        return due


class Maintenance:
    """A thread in the worker's parent process: its own heartbeat row and the recovery sweep."""

    def __init__(self, name: str, queues: list[str], enqueue: Callable[[str], None]) -> None:
        self.name, self.queues, self.enqueue = name, queues, enqueue
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="robustify-maintenance", daemon=True)
        self.devices: tuple[int, str] | None = None   # stated in the heartbeat once probed
        self.calibration: dict[str, Any] | None = None  # the reference timing (worker/devices.py), once probed

    def start(self) -> None:
        self._thread.start()
        threading.Thread(target=self._probe_devices, name="robustify-devices", daemon=True).start()

    def _probe_devices(self) -> None:
        from worker.devices import probe

        found = probe()   # seconds (torch imported in a subprocess); the heartbeat starts at once
        if found is not None:
            self.devices = found["devices"], found["device_type"]
            self.calibration = found["calibration"]

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        rt = runtime()
        sweeper = Sweeper(rt, self.enqueue)
        beat_every = rt.settings.heartbeat_seconds
        sweep_every = rt.settings.sweep_seconds
        next_sweep = 0.0  # sweep at once on start
        while not self._stop.is_set():
            self._safely(self._beat, rt)
            if time.monotonic() >= next_sweep:
                self._safely(sweeper.sweep)
                self._safely(rt.store.remove_stale_temp_files)  # left by processes killed mid-write
                next_sweep = time.monotonic() + sweep_every
            self._stop.wait(min(beat_every, sweep_every))

    def _beat(self, rt: Runtime) -> None:
        with rt.session() as s:
            record_worker_heartbeat(s, self.name, self.queues, self.devices, self.calibration)
            s.commit()

    @staticmethod
    def _safely(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # the database may be briefly unreachable; try again next round
            log.exception("worker maintenance step failed")
