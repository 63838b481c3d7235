"""Chained jobs: a successful fine-tune registers its best checkpoint as a new, ready model.

The new model has the parent's architecture and input contract (size, mean, std, class count,
data set), `parent_model_id` and `source_job_id`, and its own weights row over the same bytes as
the checkpoint (the store is content-addressed: nothing is copied, and deleting the model leaves
the job's checkpoint in place). It needs no validation: the weights were produced by training
the parent, which was validated, in the same architecture. An evaluation can run on it at once
(`robustify jobs submit --type evaluate --model <result.model_id>`).

Only a fine-tune whose best checkpoint is a trained epoch registers a model; when no epoch beat
the model that went in (there is no best checkpoint), nothing is registered and `model_id` is
null: the parent is still the model to use.
"""
from __future__ import annotations

from typing import Any

from core.service.db import Artifact, Job, Model, new_id
from core.storage.artifacts import record_same_bytes


def register_finetuned_model(session: Any, job: Job, checkpoint: Artifact) -> Model:
    """Add a ready model for `checkpoint` of fine-tune `job` (the caller commits)."""
    parent = session.get(Model, job.model_id)
    assert parent is not None, f"job {job.id} refers to a missing model {job.model_id}"
    weights = record_same_bytes(session, checkpoint, kind="model_weights", owner_key_id=job.owner_key_id)
    model = Model(
        id=new_id("mdl"), owner_key_id=job.owner_key_id, name=f"{parent.name[:150]} (W-TRADES, {job.id})", source="job",
        architecture=parent.architecture, num_classes=parent.num_classes, dataset=parent.dataset,
        input_shape=parent.input_shape, input_mean=parent.input_mean, input_std=parent.input_std,
        threat_model=parent.threat_model, status="ready", weights_artifact_id=weights.id,
        parent_model_id=parent.id, source_job_id=job.id,
        meta={"checkpoint_id": checkpoint.id, "epoch": checkpoint.epoch},
    )
    session.add(model)
    session.flush()
    return model
