"""A finished job's timing, recorded as the cost of its kind (architecture at input size) on this
worker (core/service/calibration.py), so that the next job of the kind is estimated from it.

The time is split as core.engine.estimate counts it: the recipe's seconds per image-pass (the
job's units from its config and data set) and the seconds outside the recipe (reading the model
and the data set, writing the artifacts). Only a job that ran from its start to success on one
device is recorded: a resumed job ran part of its passes, a DDP job's devices share them.
"""
from __future__ import annotations

import logging
from typing import Any

from core.engine.config import EvaluateConfig, FinetuneConfig
from core.engine.estimate import evaluate_passes, finetune_passes, kind_key
from core.service.calibration import record_kind
from core.service.db import Job, Model
from worker.inputs import input_size
from worker.runtime import Runtime

log = logging.getLogger("robustify.worker")


def worker_name() -> str | None:
    """The Celery hostname of the worker running this task (its heartbeat row's id), or None."""
    try:
        from celery import current_task

        return getattr(current_task.request, "hostname", None) if current_task else None
    except Exception:  # noqa: BLE001 - not in a task: nothing to record
        return None


def job_units(job_type: str, config: dict[str, Any], data: Any, device_type: str) -> float:
    """The job's image-passes (core.engine.estimate) from its stored config and its loaded data."""
    train, test, classes = int(data.train_y.shape[0]), int(data.test_y.shape[0]), int(data.num_classes)
    if job_type == "finetune":
        return finetune_passes(FinetuneConfig.model_validate(config), train, test, device_type, classes)["total"]
    return evaluate_passes(EvaluateConfig.model_validate(config), test, device_type, classes)["total"]


_jobs_timed = 0     # jobs this process has finished: its first one ran cold (core/service/calibration.py)


def record_job_timing(rt: Runtime, job_id: str, setup: Any, device_type: str, recipe_seconds: float,
                      outside_seconds: float) -> None:
    """Record the job's cost on this worker's heartbeat row; never fails the job."""
    global _jobs_timed
    warm = _jobs_timed > 0
    _jobs_timed += 1
    name = worker_name()
    if name is None or setup.resume is not None:
        return
    try:
        units = job_units(setup.job_type, setup.config, setup.data, device_type)
        with rt.session() as s:
            job = s.get(Job, job_id)
            model_row = s.get(Model, job.model_id) if job is not None else None
            if model_row is None or units <= 0:
                return
            key = kind_key(model_row.architecture, input_size(model_row))
            kind = record_kind(s, name, key, recipe_seconds / units, outside_seconds, warm)
            s.commit()
        if kind is not None:
            log.info("job %s: %s took %.3g s per image-pass (%d units) and %.1f s outside the recipe (%s process)",
                     job_id, key, recipe_seconds / units, units, outside_seconds, "warm" if warm else "cold")
    except Exception:  # noqa: BLE001 - a calibration is a hint, never a reason to fail a job
        log.exception("job %s: could not record its timing for the estimate", job_id)
