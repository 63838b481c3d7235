"""The worker's side of bring-your-own models and data, on real databases (PostgreSQL and SQLite)
and a real artifact store: loading a model row with its input contract and an image-folder data
set, registering a fine-tune's checkpoint as a model, and events a recipe reports."""
from __future__ import annotations

from pathlib import Path

import torch

from core.engine.checkpoint import save_weights
from core.service.db import Artifact, Job, JobEvent, Model, new_id, utcnow
from core.storage.artifacts import ArtifactStore, delete_artifact, record_artifact
from tests.e2e.test_claim import rt  # noqa: F401  (the worker runtime on PostgreSQL and on SQLite)
from worker.chain import register_finetuned_model
from worker.hooks import Heartbeat, JobHooks
from worker.inputs import load_data_for, load_model_for
from worker.runtime import Runtime, worker_id


def _model_with_weights(rt: Runtime, tmp_path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    from core.engine.zoo import create_model

    torch.manual_seed(0)
    state = create_model("small-cnn", num_classes=3, in_channels=3, image_size=16).state_dict()
    save_weights(state, tmp_path / "cnn.safetensors")
    with rt.session() as s:
        art = record_artifact(s, rt.store, kind="model_weights", src_path=tmp_path / "cnn.safetensors",
                              filename="cnn.safetensors", content_type="application/octet-stream")
        m = Model(id=new_id("mdl"), name="cnn", source="upload", architecture="small-cnn", num_classes=3,
                  dataset="mine", input_shape=[3, 16, 16], input_mean=[0.485, 0.456, 0.406],
                  input_std=[0.229, 0.224, 0.225], status="ready", weights_artifact_id=art.id)
        s.add(m)
        s.commit()
        return m.id, state


def _job(rt: Runtime, model_id: str) -> str:
    with rt.session() as s:
        job = Job(id=new_id("job"), type="finetune", status="running", model_id=model_id, dataset="digits",
                  threat_model={}, config={}, attempt=1, max_attempts=3, worker_id=worker_id(), created_at=utcnow())
        s.add(job)
        s.commit()
        return job.id


def test_a_model_row_loads_with_its_input_contract_and_data_with_its_classes(rt: Runtime, tmp_path: Path) -> None:
    from core.engine.data.imagefolder import ImageFolderLimits, read_image_folder
    from core.service.db import Dataset
    from tests.archives import CLASSES, folder_entries, zip_bytes

    model_id, state = _model_with_weights(rt, tmp_path)
    with rt.session() as s:
        model = load_model_for(rt, s, s.get(Model, model_id))
    assert type(model).__name__ == "PixelInputModel" and list(model.state_dict()) == list(state)
    assert torch.allclose(model.normalize.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))

    (tmp_path / "p.zip").write_bytes(zip_bytes(folder_entries(per_class=4, split=True)))
    folder = read_image_folder(tmp_path / "p.zip", limits=ImageFolderLimits(10**7, 10**7, 10**8), image_size=(16, 16))
    folder.save_npz(tmp_path / "p.npz")
    with rt.session() as s:
        art = record_artifact(s, rt.store, kind="dataset", src_path=tmp_path / "p.npz", filename="p.npz",
                              content_type="application/octet-stream")
        s.add(Dataset(id="ds_photos", name="photos", status="ready", num_examples=18, num_classes=3,
                      image_shape=[3, 16, 16], artifact_id=art.id, class_names=list(CLASSES)))
        s.commit()
        data = load_data_for(rt, s, "ds_photos")
    assert data.class_names == list(CLASSES) and data.name == "photos"
    assert tuple(data.train_x.shape) == (12, 3, 16, 16) and tuple(data.test_x.shape) == (6, 3, 16, 16)


def test_the_best_checkpoint_becomes_a_ready_model_that_outlives_its_deletion(rt: Runtime, tmp_path: Path) -> None:
    model_id, state = _model_with_weights(rt, tmp_path)
    job_id = _job(rt, model_id)
    save_weights({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "best.safetensors")
    with rt.session() as s:
        ckpt = record_artifact(s, rt.store, kind="checkpoint", src_path=tmp_path / "best.safetensors",
                               filename=f"{job_id}-epoch1.safetensors", content_type="application/octet-stream",
                               job_id=job_id, epoch=1, is_best=True)
        child = register_finetuned_model(s, s.get(Job, job_id), ckpt)
        s.commit()
        child_id, ckpt_sha = child.id, ckpt.sha256
    with rt.session() as s:
        child = s.get(Model, child_id)
        parent = s.get(Model, model_id)
        assert (child.status, child.source, child.parent_model_id, child.source_job_id) == (
            "ready", "job", model_id, job_id)
        for field in ("architecture", "num_classes", "dataset", "input_shape", "input_mean", "input_std"):
            assert getattr(child, field) == getattr(parent, field), field
        weights = s.get(Artifact, child.weights_artifact_id)
        assert weights.sha256 == ckpt_sha and weights.kind == "model_weights" and weights.job_id is None
        loaded = load_model_for(rt, s, child)
        assert torch.equal(loaded.state_dict()["classifier.3.bias"], state["classifier.3.bias"] + 1)
        # deleting the model's weights (as DELETE /v1/models does) leaves the job's checkpoint file in place
        child.weights_artifact_id = None
        delete_artifact(s, rt.store, weights)
    assert rt.store.exists(ArtifactStore.relpath_for(ckpt_sha))


def test_recipe_events_are_job_events(rt: Runtime, tmp_path: Path) -> None:
    model_id, _ = _model_with_weights(rt, tmp_path)
    job_id = _job(rt, model_id)
    with rt.session() as s:
        job = s.get(Job, job_id)
    hooks = JobHooks(rt, job, worker_id(), Heartbeat(rt, job_id, worker_id())).as_hooks()
    hooks.event("warning", "CUDA out of memory in w-pgd with batch size 64; retrying with batch size 32",
                {"batch_size": 32, "previous_batch_size": 64})
    with rt.session() as s:
        (event,) = s.query(JobEvent).filter(JobEvent.job_id == job_id).all()
    assert ((event.type, event.level, event.data)
            == ("warning", "warning", {"batch_size": 32, "previous_batch_size": 64}))


def _validating(rt: Runtime, tmp_path: Path, dataset: str, shape: list[int]) -> str:
    """An untrained small-cnn uploaded for `dataset`, as the API leaves it for the worker."""
    from core.engine.zoo import create_model

    torch.manual_seed(0)
    path = tmp_path / f"{dataset}.safetensors"
    save_weights(create_model("small-cnn", num_classes=10, in_channels=shape[0], image_size=shape[1]).state_dict(),
                 path)
    with rt.session() as s:
        art = record_artifact(s, rt.store, kind="model_weights", src_path=path, filename=path.name,
                              content_type="application/octet-stream")
        m = Model(id=new_id("mdl"), name=dataset, source="upload", architecture="small-cnn", num_classes=10,
                  dataset=dataset, input_shape=shape, input_mean=[0.0] * shape[0], input_std=[1.0] * shape[0],
                  status="validating", weights_artifact_id=art.id, meta={"team": "vision"})
        s.add(m)
        s.commit()
        return m.id


def test_validation_records_the_sanity_check_or_why_it_was_skipped(rt: Runtime, tmp_path: Path) -> None:
    """The model is ready either way; its row keeps the caller's metadata next to the check. CIFAR-10
    is not under this runtime's data folder and is never downloaded for the check."""
    from core.engine.sanity import SANITY_CHECK_KEY
    from worker.validate import _validate_model

    ids = {ds: _validating(rt, tmp_path, ds, shape) for ds, shape in
           (("digits", [1, 8, 8]), ("cifar10", [3, 32, 32]), ("my-photos", [3, 32, 32]))}
    assert all(_validate_model(rt, model_id) == "ready" for model_id in ids.values())
    with rt.session() as s:
        rows = {ds: s.get(Model, model_id) for ds, model_id in ids.items()}
    checks = {ds: m.meta[SANITY_CHECK_KEY] for ds, m in rows.items()}
    assert all(m.status == "ready" and m.meta["team"] == "vision" for m in rows.values())
    assert checks["digits"]["status"] == "warning" and checks["digits"]["near_chance"]   # untrained: chance
    assert checks["digits"]["n"] == 256 and checks["digits"]["message"].startswith("Warning: the model barely")
    assert checks["cifar10"]["status"] == "skipped" and checks["cifar10"]["accuracy"] is None
    assert "cifar10 is not on this worker's disk, and the check never downloads" in checks["cifar10"]["message"]
    assert not (tmp_path / "datasets" / "cifar-10-batches-py").exists()
    assert checks["my-photos"]["status"] == "skipped"
    assert "'my-photos' is not a data set of this service" in checks["my-photos"]["message"]
