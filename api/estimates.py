"""A submitted job's estimated run time on an idle worker of each device class (docs/runtimes.md,
"Before you submit: the estimate"): its image-passes counted from its config and data set
(core.engine.estimate), times the cost per pass the workers measured (core.service.calibration).

Torch-free. The estimate is made once, at submit: stored in the job's "queued" event and returned by
POST /v1/jobs and GET /v1/jobs/{id}. It never refuses a submit: anything it cannot work out leaves
`devices` empty with the `reason`.
"""
from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.compatibility import DEFAULT_INPUT_SHAPE, UPLOAD_TEST_FRACTION, DatasetFacts
from api.crud import find_owned_dataset
from api.deps import Caller
from core.engine.config import EvaluateConfig, FinetuneConfig
from core.engine.estimate import combine, evaluate_passes, finetune_passes
from core.service.calibration import worker_calibrations
from core.service.db import Artifact, JobEvent, Model
from core.service.settings import Settings

log = logging.getLogger("robustify.api")

# The test split of each built-in data set (digits: scikit-learn's 1,797 images less the 1,438 of
# api.compatibility.BUILTIN_CLASSES_AND_TRAIN).
BUILTIN_TEST_EXAMPLES: dict[str, int] = {"digits": 359, "fashion-mnist": 10000, "cifar10": 10000, "cifar100": 10000}
BYTES_PER_PARAMETER = 4     # stored weights are float32: their size gives the parameter count


def test_examples(session: Session, who: Caller, dataset: str) -> int:
    """The images of the data set's test split."""
    if dataset in BUILTIN_TEST_EXAMPLES:
        return BUILTIN_TEST_EXAMPLES[dataset]
    row = find_owned_dataset(session, who, dataset)
    if row is None:
        return 0
    splits = row.splits or {}
    return int(splits["test"]) if "test" in splits else round(UPLOAD_TEST_FRACTION * row.num_examples)


def parameter_count(session: Session, model: Model) -> int | None:
    """About how many parameters the model has, from the size of its stored weights."""
    art = session.get(Artifact, model.weights_artifact_id) if model.weights_artifact_id else None
    return art.size // BYTES_PER_PARAMETER if art is not None else None


def job_estimate(session: Session, settings: Settings, who: Caller, job_type: str, config: dict[str, Any],
                 model: Model, facts: DatasetFacts) -> dict[str, Any]:
    """The estimate of a job about to be queued (core.engine.estimate.combine's shape)."""
    if job_type not in ("finetune", "evaluate"):
        return {"kind": None, "passes": {}, "devices": {},
                "reason": f"no estimate for a {job_type} job: each job it starts has its own"}
    try:
        test = test_examples(session, who, facts.name)
        if job_type == "finetune":
            ft = FinetuneConfig.model_validate(config)

            def passes(device_type: str) -> dict[str, float]:
                return finetune_passes(ft, facts.train_examples, test, device_type, facts.num_classes)
        else:
            ev = EvaluateConfig.model_validate(config)

            def passes(device_type: str) -> dict[str, float]:
                return evaluate_passes(ev, test, device_type, facts.num_classes)
        workers = worker_calibrations(session, settings.stale_heartbeat_seconds, settings.gpu_queue)
        return combine(passes, model.architecture, model.input_shape or DEFAULT_INPUT_SHAPE,
                       parameter_count(session, model), workers)
    except Exception as exc:  # noqa: BLE001 - an estimate never refuses a submit
        log.exception("could not estimate a %s job of model %s", job_type, model.id)
        return {"kind": None, "passes": {}, "devices": {}, "reason": f"could not estimate ({type(exc).__name__})"}


def stored_estimate(session: Session, job_id: str) -> dict[str, Any] | None:
    """The estimate made when the job was submitted (its first "status" event), or None."""
    first = session.scalar(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "status")
                           .order_by(JobEvent.id).limit(1))
    estimate = (first.data or {}).get("estimate") if first is not None else None
    return estimate if isinstance(estimate, dict) else None
