"""The workers' calibrations, kept in their heartbeat rows (core.service.db.heartbeat_calibration):
read for a job's estimate (core.engine.estimate.combine), and a finished job's timing recorded as
its kind's cost on that worker.

A worker's calibration: {"device_class", "device_type", "device_name", "reference": {architecture,
input_shape, batch, params, passes, seconds_per_unit}, "measured_at", "kinds": {kind_key:
{"seconds_per_unit", "overhead_seconds", "jobs", "samples": [[seconds_per_unit, overhead_seconds,
warm], ...], "measured_at"}}}. The reference is
timed when the worker starts (worker/devices.py); a kind is written by the worker's job process when
a job of that kind succeeds (worker/calibration.py). Rows of stopped workers keep their kinds: a
device class's measurements outlive the worker that made them.
"""
from __future__ import annotations

import statistics
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.engine.estimate import WorkerCalibration
from core.service.db import (
    WorkerHeartbeat,
    as_utc,
    heartbeat_calibration,
    heartbeat_queues,
    set_heartbeat_calibration,
    utcnow,
)

KEPT_SAMPLES = 5        # a kind's cost is the median of its latest jobs' on the worker


def worker_calibrations(session: Session, stale_seconds: float, queue: str) -> list[WorkerCalibration]:
    """The calibration of every worker that consumes `queue` (the jobs' queue: a worker that only
    validates models never runs a job), `live` when its heartbeat is newer than `stale_seconds`."""
    since = utcnow() - timedelta(seconds=stale_seconds)
    out = []
    for row in session.scalars(select(WorkerHeartbeat)):
        cal = heartbeat_calibration(row)
        if not cal or not cal.get("device_class") or queue not in heartbeat_queues(row):
            continue
        beat = as_utc(row.heartbeat_at)
        out.append(WorkerCalibration(worker=row.id, live=beat is not None and beat >= since,
                                     device_class=str(cal["device_class"]), reference=dict(cal.get("reference") or {}),
                                     kinds=dict(cal.get("kinds") or {})))
    return out


def record_kind(session: Session, worker: str, key: str, seconds_per_unit: float, overhead_seconds: float,
                warm: bool = True) -> dict[str, Any] | None:
    """Add a finished job's cost to its kind on `worker`'s row (locked for the update; the caller
    commits): the kind's cost becomes the median of its latest KEPT_SAMPLES jobs' that ran in a
    warm process (one that had run a job before: the first job of a process also imports the
    engine and reads its data set for the first time), or of the cold ones while there is none.
    None when the row has no calibration yet (its probe has not finished)."""
    row = session.get(WorkerHeartbeat, worker, with_for_update=True)
    cal = heartbeat_calibration(row) if row is not None else None
    if row is None or cal is None:
        return None
    kinds = dict(cal.get("kinds") or {})
    prior = kinds.get(key) or {}
    samples = [*prior.get("samples", []), [seconds_per_unit, overhead_seconds, warm]][-KEPT_SAMPLES:]
    counted = [s for s in samples if len(s) < 3 or s[2]] or samples
    kinds[key] = {"seconds_per_unit": statistics.median(s[0] for s in counted),
                  "overhead_seconds": statistics.median(s[1] for s in counted),
                  "jobs": int(prior.get("jobs", 0)) + 1, "samples": samples,
                  "measured_at": utcnow().isoformat(timespec="seconds")}
    set_heartbeat_calibration(row, {**cal, "kinds": kinds})
    return kinds[key]
