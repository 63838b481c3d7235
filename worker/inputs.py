"""A job's inputs: the model, the data, the training state it resumes from, and the ids its report names.

`set_up_job` is the one place that reads them, for a job on one device and for every rank of a
job on several (worker/ddp.py), so both run the recipe with the same checks and the same
provenance. Torch and the engine are imported inside the functions: the worker's parent
process must not touch CUDA (fork and CUDA do not mix).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from core.engine.architecture_names import parse_architecture
from core.errors import ErrorCode, RobustifyError
from core.service.db import Artifact, Dataset, Job, Model
from core.storage.artifacts import artifact_relpath
from worker.claim import add_event
from worker.hooks import Heartbeat, JobHooks, LostOwnership
from worker.measurecache import StoreCache
from worker.runtime import Runtime


def input_size(model_row: Model) -> list[int]:
    """[C, H, W] of the model's input (a row registered before sizes were stored: CIFAR's)."""
    return list(model_row.input_shape or [3, 32, 32])


def load_model_for(rt: Runtime, session: Any, model_row: Model) -> Any:
    """The nn.Module of a model row, taking [0, 1] pixels: its stored safetensors weights (an
    upload, a fine-tune's result, or a validated RobustBench or Hub model), the RobustBench zoo,
    or the Hugging Face Hub cache (a Hub model before its validation stored the weights)."""
    from core.engine import zoo

    shape = input_size(model_row)
    if model_row.weights_artifact_id:
        art = session.get(Artifact, model_row.weights_artifact_id)
        if art is None:
            raise RobustifyError(f"the weights of model {model_row.id} are missing; register the model again.",
                                 code=ErrorCode.INVALID_MODEL_FILE)
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
        return load_hub_model_for(rt, model_row)
    name = parse_architecture(model_row.architecture).name   # robustbench:<model name>
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
                                 code=ErrorCode.DATASET_UNAVAILABLE)
        return data.load_npz(rt.store.local_path(artifact_relpath(art)), name=row.name)
    return data.load_dataset(dataset, data_dir=rt.settings.resolved_datasets_dir,
                             allow_download=rt.settings.allow_download)


def load_hub_model_for(rt: Runtime, m: Model) -> Any:
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


def provenance_context(s: Any, job: Job, model_row: Model) -> dict[str, Any]:
    """The ids a report names, and the sha256 of the weights the job started from."""
    weights = s.get(Artifact, model_row.weights_artifact_id) if model_row.weights_artifact_id else None
    return {"job_id": job.id, "model_id": model_row.id, "dataset": job.dataset,
            "model_sha256": weights.sha256 if weights is not None else None}


def load_resume(rt: Runtime, s: Any, job_id: str, artifact_id: str, hooks: JobHooks | None) -> Any:
    """The training state to resume from (None when its row is gone). With the hooks of the run
    that reports (one device, or rank 0), the best checkpoint so far is remembered and the resume
    is an event; the other ranks only read the state."""
    from core.engine.checkpoint import load_training_checkpoint

    art = s.get(Artifact, artifact_id)
    if art is None:
        return None
    ckpt = load_training_checkpoint(rt.store.local_path(artifact_relpath(art)))
    if hooks is None:
        return ckpt
    best = s.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "checkpoint",
                                           Artifact.is_best.is_(True))
                    .order_by(Artifact.created_at.desc(), Artifact.id.desc()).limit(1))
    hooks.best_checkpoint_id = best.id if best is not None else None
    add_event(s, job_id, "status", f"resuming from the checkpoint after epoch {ckpt.epoch}",
              {"resumed_from_epoch": ckpt.epoch, "training_state_id": artifact_id})
    s.commit()
    return ckpt


# ---------------------------------------------------------------------- one job's setup
@dataclass
class JobSetup:
    """What a run of the job's recipe needs, read once from its rows."""

    job_type: str
    config: dict[str, Any]        # the job's stored recipe config (JSON)
    model: Any                    # nn.Module taking [0, 1] pixels
    data: Any                     # core.engine.data.datasets.Data
    resume: Any                   # the training state a fine-tune resumes from, or None
    context: dict[str, Any]       # the ids its report's provenance names (provenance_context)
    hooks: JobHooks | None        # None on a rank that does not report (ranks 1.. of a DDP job)
    cache: StoreCache | None = None   # the measurements a fine-tune may share with others (worker/measurecache.py)

    def finetune(self, hooks: Any, *, device: str, world: Any = None) -> Any:
        """core.engine.recipes.finetune on this setup; `hooks` are the core.engine.hooks.Hooks to call."""
        from core.engine.config import FinetuneConfig
        from core.engine.distributed import SINGLE
        from core.engine.recipes.finetune import finetune

        return finetune(FinetuneConfig.model_validate(self.config), self.model, self.data, hooks, device=device,
                        resume=self.resume, context=self.context, world=world or SINGLE, cache=self.cache)

    def evaluate(self, hooks: Any, *, device: str) -> Any:
        from core.engine.config import EvaluateConfig
        from core.engine.recipes.evaluate import evaluate

        return evaluate(EvaluateConfig.model_validate(self.config), self.model, self.data, hooks, device=device,
                        context=self.context)


def set_up_job(rt: Runtime, job_id: str, owner: str, hb: Heartbeat, resume_artifact_id: str | None, *,
               reports: bool = True) -> JobSetup:
    """Read a claimed job's model, data and resume state. `reports`: this process writes the job's
    progress and checkpoints (it gets JobHooks); False on the ranks of a DDP job other than 0.

    A job whose model row is gone fails here, with the same error on every path."""
    with rt.session() as s:
        job = s.get(Job, job_id)
        if job is None:  # deleted under a running worker: nothing left to write to
            raise LostOwnership(job_id)
        model_row = s.get(Model, job.model_id)
        if model_row is None:
            raise RobustifyError(f"model {job.model_id} no longer exists; register the model again and "
                                 "submit a new job.", code=ErrorCode.VALIDATION_ERROR)
        model = load_model_for(rt, s, model_row)
        data = load_data_for(rt, s, job.dataset)
        hooks = JobHooks(rt, job, owner, hb) if reports else None
        resume = None
        if job.type == "finetune" and resume_artifact_id:
            resume = load_resume(rt, s, job_id, resume_artifact_id, hooks)
        return JobSetup(job.type, job.config, model, data, resume, provenance_context(s, job, model_row), hooks,
                        StoreCache(rt.store))
