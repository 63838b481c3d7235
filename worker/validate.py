"""Validating a registered model: it loads and answers with the right shape, so it is ready; or it
is rejected with the reason (an upload's file is then deleted). A ready model also carries its
sanity check (core/engine/sanity.py): its clean accuracy on a sample of the registered data
set's test split, and a warning naming the likely cause when that looks wrong.

Torch and the engine are imported inside the functions, never at module import (the worker's
parent process must not touch CUDA).
"""
from __future__ import annotations

import logging
from typing import Any

from core.engine.sanity import SANITY_CHECK_KEY, skipped_check
from core.errors import DatasetUnavailable, ErrorCode, RobustifyError
from core.service.db import Artifact, Model
from core.storage.artifacts import delete_artifact, record_artifact
from worker.inputs import input_size, load_data_for, load_model_for
from worker.outage import DatabaseUnavailable, is_database_down, retry_while_down
from worker.runtime import Runtime, runtime

log = logging.getLogger("robustify.worker")


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
            check = _sanity_check(rt, s, m, model)
            if m.weights_artifact_id is None:  # RobustBench, Hub: keep its weights as safetensors
                m.weights_artifact_id = _store_state_dict(rt, s, m, model).id
            if m.input_mean is None:  # RobustBench models normalise inside: identity
                m.input_mean, m.input_std = [0.0] * input_size(m)[0], [1.0] * input_size(m)[0]
            m.meta = {**(m.meta or {}), SANITY_CHECK_KEY: check}
            m.status, m.error = "ready", None
            s.commit()
            log.info("model %s ready; %s", model_id, check["message"])
            return "ready"
        except Exception as exc:  # noqa: BLE001 - any failure rejects the model with a reason
            if is_database_down(exc):
                raise  # not the model's fault: validated again once the database answers
            s.rollback()
            m = s.get(Model, model_id)
            if m is None:  # deleted meanwhile: nothing left to reject
                return "skipped"
            if isinstance(exc, RobustifyError):
                error = exc.to_dict()
            else:
                error = {"code": ErrorCode.INVALID_MODEL_FILE,
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

    shape = input_size(m)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    if tuple(out.shape) != (2, m.num_classes):
        raise RobustifyError(f"the model outputs shape {tuple(out.shape)} for input {shape}, expected "
                             f"(batch, {m.num_classes}); check num_classes and input_shape.",
                             code=ErrorCode.INVALID_MODEL_FILE)


def _sanity_check(rt: Runtime, s: Any, m: Model, model: Any) -> dict[str, Any]:
    """The model's sanity check on its registered data set, or why it was skipped. Never downloads a
    data set (a registration stays fast), and never rejects the model."""
    from core.engine.data.datasets import BUILTIN_DATASETS, load_dataset
    from core.engine.sanity import sanity_check

    if m.dataset not in BUILTIN_DATASETS and not m.dataset.startswith("ds_"):
        return skipped_check(m.dataset, f"{m.dataset!r} is not a data set of this service (a built-in one or an "
                                        "uploaded one's id), so there are no test images to check the model on.")
    try:
        with s.no_autoflush:  # nothing written while the check runs (SQLite: no write lock held meanwhile)
            data = (load_data_for(rt, s, m.dataset) if m.dataset.startswith("ds_") else
                    load_dataset(m.dataset, data_dir=rt.settings.resolved_datasets_dir, allow_download=False))
    except DatasetUnavailable:
        return skipped_check(m.dataset, f"{m.dataset} is not on this worker's disk, and the check never downloads a "
                                        "data set (a job downloads it where the server allows downloads; models "
                                        "registered after that are checked).")
    except RobustifyError as exc:
        return skipped_check(m.dataset, f"the data set could not be read ({exc}).")
    try:
        return sanity_check(model, data, num_classes=m.num_classes, input_shape=input_size(m),
                            input_mean=m.input_mean, input_std=m.input_std)
    except Exception as exc:  # noqa: BLE001 - a check that cannot run is reported, the model stays ready
        if is_database_down(exc):
            raise
        log.warning("model %s: the sanity check failed", m.id, exc_info=True)
        return skipped_check(m.dataset, f"it failed ({type(exc).__name__}: {exc}).")


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
