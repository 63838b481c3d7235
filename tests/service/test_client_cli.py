"""`robustify models|datasets|jobs|architectures …` against a live uvicorn server on PostgreSQL and Redis."""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from typing import Any

import pytest
import torch
from torch import nn

import robustify
from cli.main import main
from core.engine.sanity import SANITY_CHECK_KEY, sanity_check
from core.service.db import Job, Model, utcnow
from core.storage.artifacts import ArtifactStore, record_artifact
from tests.service.conftest import LiveServer
from tests.service.payloads import npz_bytes, pickle_bytes, safetensors_bytes


@pytest.fixture(scope="module")
def live(app):
    with LiveServer(app) as server:
        yield server


def run(capsys, live, keys, *argv: str, key: str = "a") -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([*argv, "--url", live.url, "--key", keys[key]["key"]])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_models_and_datasets(capsys, live, keys, tmp_path, db):
    weights = tmp_path / "cnn.safetensors"
    weights.write_bytes(safetensors_bytes(seed=3))
    rc, out, _ = run(capsys, live, keys, "models", "upload", str(weights), "--architecture", "small-cnn",
                     "--num-classes", "10", "--dataset", "digits", "--json")
    assert rc == 0
    model = json.loads(out)
    assert model["status"] == "validating" and model["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    rc, out, _ = run(capsys, live, keys, "models", "list")
    assert rc == 0 and model["id"] in out

    bad = tmp_path / "model.pt"
    bad.write_bytes(pickle_bytes())
    rc, _, err = run(capsys, live, keys, "models", "upload", str(bad), "--architecture", "small-cnn",
                     "--num-classes", "10", "--dataset", "digits")
    assert rc == 1 and "arbitrary code" in err and "invalid_model_file" in err

    data = tmp_path / "tiny.npz"
    data.write_bytes(npz_bytes(n=12))
    rc, out, _ = run(capsys, live, keys, "datasets", "upload", str(data))
    assert rc == 0 and "12 images" in out
    rc, out, _ = run(capsys, live, keys, "datasets", "list")
    assert "tiny.npz" in out and "built-in" in out

    capsys.readouterr()
    assert main(["models", "list", "--url", live.url, "--key", "rk_wrong"]) == 1
    assert "unauthorized" in capsys.readouterr().err


def test_byo_commands(capsys, live, keys, tmp_path):
    """Image-folder upload options, the input contract, Hub registration and the architecture list."""
    from tests.archives import CLASSES, folder_entries, zip_bytes

    photos = tmp_path / "photos.zip"
    photos.write_bytes(zip_bytes(folder_entries(per_class=3)))
    rc, out, _ = run(capsys, live, keys, "datasets", "upload", str(photos), "--image-size", "16", "--channels", "1",
                     "--test-fraction", "0.34", "--seed", "2")
    assert rc == 0 and "[1, 16, 16]" in out and f"classes {', '.join(CLASSES)}" in out
    assert "{'train': 6, 'test': 3}" in out

    weights = tmp_path / "timm.safetensors"
    weights.write_bytes(safetensors_bytes(seed=4))
    rc, out, _ = run(capsys, live, keys, "models", "upload", str(weights), "--architecture", "timm:resnet18",
                     "--num-classes", "3", "--dataset", "imagenet", "--input-size", "3,224,224",
                     "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--json")
    model = json.loads(out)
    assert rc == 0 and model["input_size"] == [3, 224, 224] and model["input_std"] == [0.229, 0.224, 0.225]
    rc, out, _ = run(capsys, live, keys, "models", "hub", "acme/tiny", "--num-classes", "3", "--dataset",
                     "imagenet", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--json")
    hub = json.loads(out)
    assert rc == 0 and hub["architecture"] == "timm:hf-hub:acme/tiny" and hub["input_mean"] == [0.5, 0.5, 0.5]

    rc, out, _ = run(capsys, live, keys, "architectures", "list")
    assert rc == 0 and "small-cnn" in out and "timm:<model name>" in out
    rc, out, _ = run(capsys, live, keys, "architectures", "list", "--family", "builtin", "--q", "wide")
    assert rc == 0 and out.split() == ["wide-resnet-28-10", "wide-resnet-34-10"]
    # a family's names are listed by the server in the background, once: the command waits for them
    rc, out, err = run(capsys, live, keys, "architectures", "list", "--family", "torchvision", "--q", "resnet1*")
    assert rc == 0 and out.split() == ["torchvision:resnet101", "torchvision:resnet152", "torchvision:resnet18"], out
    assert "listing the torchvision architectures" in err and "waiting" in err


def test_jobs_submit_watch_download_cancel(capsys, live, keys, db, settings, tmp_path):
    model = db.add_model(keys["a"]["id"], status="ready")
    rc, out, err = run(capsys, live, keys, "jobs", "submit", "--model", model, "--dataset", "digits",
                       "--delta", "0.05", "--set", "epochs=2", "--set", "lr=0.02", "--json")
    assert rc == 0, err
    job = json.loads(out)
    assert job["config"]["epochs"] == 2 and job["config"]["lr"] == 0.02 and job["threat_model"]["delta"] == 0.05

    rc, _, err = run(capsys, live, keys, "jobs", "submit", "--model", model, "--dataset", "digits",
                     "--set", "epochs=0")
    assert rc == 1 and "config.epochs" in err

    store = ArtifactStore(settings.resolved_artifact_dir)
    weights = safetensors_bytes(seed=9)

    def fake_worker() -> None:  # what the worker does, written straight into the database
        db.update(Job, job["id"], status="running", started_at=utcnow())
        db.add_event(job["id"], "status", {"status": "running"})
        for frac in (0.25, 0.5, 1.0):
            time.sleep(0.1)
            db.update(Job, job["id"], progress={"fraction": frac, "phase": "train"})
            db.add_event(job["id"], "progress", {"fraction": frac})
        with db.Session() as s:
            ck = record_artifact(s, store, kind="checkpoint", content=weights, filename="best.safetensors",
                                 content_type="application/octet-stream", job_id=job["id"], epoch=2, is_best=True)
            record_artifact(s, store, kind="report", content=b'{"w2_robust_accuracy": 0.5}',
                            filename="report.json", content_type="application/json", job_id=job["id"])
            s.commit()
            ck_id = ck.id
        labels = {"delta": 0.05, "threat_model": "w2-linf", "w2_threat": "w2-linf", "pointwise_threat": "linf",
                  "n_examples": 359}
        db.update(Job, job["id"], status="succeeded", finished_at=utcnow(), result={
            "type": "finetune", "best_checkpoint_id": ck_id, "improved": True, "best_epoch": 2,
            "epochs_completed": 2, "selection": {"metric": "w2_robust_accuracy", "max_clean_drop": 0.1},
            "before": {**labels, "clean_accuracy": 0.9, "w2_robust_accuracy": 0.4, "linf_robust_accuracy": 0.6},
            "after": {**labels, "clean_accuracy": 0.88, "w2_robust_accuracy": 0.5, "linf_robust_accuracy": 0.7},
            "config": job["config"]})
        db.add_event(job["id"], "status", {"status": "succeeded"})

    t = threading.Thread(target=fake_worker)
    t.start()
    rc, out, err = run(capsys, live, keys, "jobs", "watch", job["id"])
    t.join()
    assert rc == 0, err
    # stdout is not a terminal here: plain progress lines on stdout (a line per change), not tqdm frames
    progress = [line for line in out.splitlines() if re.match(r"\d\d:\d\d:\d\d  ", line)]
    assert progress and re.search(r"succeeded\s+100%", progress[-1]), out
    assert len(progress) <= 6 and "\r" not in out and not err, (out, err)
    # the watch ends with the before/after table that the demo and the local CLI print
    assert re.search(r"W2 robust accuracy\s+0\.400\s+0\.500\s+\+0\.100\s+W2 ball, l-inf cost, δ=0\.05", out), out
    assert "l-inf robust accuracy" in out and "IMPROVED: the best checkpoint is epoch 2 of 2" in out
    assert "(test set, 359 images; 95 % intervals" in out and "trained 2 epochs" in out

    rc, out, _ = run(capsys, live, keys, "jobs", "download", job["id"], "--out", str(tmp_path / "dl"))
    assert rc == 0
    assert (tmp_path / "dl" / "best.safetensors").read_bytes() == weights
    assert json.loads((tmp_path / "dl" / "report.json").read_text()) == {"w2_robust_accuracy": 0.5}
    assert "(none yet)" in out  # no plot

    rc, out, _ = run(capsys, live, keys, "jobs", "get", job["id"])
    assert rc == 0 and "succeeded" in out and "W2 robust accuracy" in out and "IMPROVED" in out

    rc, out, _ = run(capsys, live, keys, "jobs", "submit", "--model", model, "--dataset", "digits", "--quiet")
    queued = out.strip()                   # --quiet: the id alone, for scripts
    assert rc == 0 and re.fullmatch(r"job_\w+", queued), out
    rc, out, _ = run(capsys, live, keys, "jobs", "cancel", queued)
    assert rc == 0 and "cancelled" in out
    rc, _, err = run(capsys, live, keys, "jobs", "get", queued, key="b")
    assert rc == 1 and "not_found" in err


def test_every_resource_is_reachable(capsys, live, keys, db, settings, tmp_path):
    """get/list (paged)/delete of models and data sets, a job's events and checkpoints, the
    download of one epoch's checkpoint, the webhook endpoints, with --json for scripts."""
    weights = tmp_path / "cnn.safetensors"
    weights.write_bytes(safetensors_bytes(seed=5))
    ids = []
    for _ in range(3):
        rc, out, _ = run(capsys, live, keys, "models", "upload", str(weights), "--architecture", "small-cnn",
                         "--num-classes", "10", "--dataset", "digits", "--json", key="b")
        ids.append(json.loads(out)["id"])
    rc, out, _ = run(capsys, live, keys, "models", "get", ids[0], "--json", key="b")
    assert rc == 0 and json.loads(out)["id"] == ids[0]
    rc, out, err = run(capsys, live, keys, "models", "list", "--limit", "2", "--json", key="b")
    first = json.loads(out)
    assert rc == 0 and len(first["data"]) == 2 and first["has_more"] is True
    rc, out, err = run(capsys, live, keys, "models", "list", "--limit", "2", key="b")
    assert f"--after {first['last_id']}" in err
    rc, out, _ = run(capsys, live, keys, "models", "list", "--limit", "2", "--after", first["last_id"], "--json",
                     key="b")
    assert [m["id"] for m in first["data"] + json.loads(out)["data"]] == ids[::-1]
    rc, out, _ = run(capsys, live, keys, "models", "list", "--limit", "1", "--all", "--json", key="b")
    assert [m["id"] for m in json.loads(out)["data"]] == ids[::-1]
    rc, out, _ = run(capsys, live, keys, "models", "delete", ids[0], key="b")
    assert rc == 0 and f"{ids[0]}: deleted" in out
    rc, _, err = run(capsys, live, keys, "models", "get", ids[0], key="b")
    assert rc == 1 and "not_found" in err and len(err.strip().splitlines()) == 1

    data = tmp_path / "tiny.npz"
    data.write_bytes(npz_bytes(n=12))
    rc, out, _ = run(capsys, live, keys, "datasets", "upload", str(data), "--json", key="b")
    ds = json.loads(out)["id"]
    rc, out, _ = run(capsys, live, keys, "datasets", "get", ds, key="b")
    assert rc == 0 and "12 images" in out
    rc, out, _ = run(capsys, live, keys, "datasets", "delete", ds, key="b")
    assert rc == 0 and "deleted" in out

    model = db.add_model(keys["b"]["id"])
    job = db.add_job(keys["b"]["id"], model, status="succeeded")
    db.add_event(job, "status", {"status": "running"}, message="job running")
    store = ArtifactStore(settings.resolved_artifact_dir)
    with db.Session() as s:
        for epoch in (1, 2):
            record_artifact(s, store, kind="checkpoint", content=safetensors_bytes(seed=epoch),
                            filename=f"epoch_{epoch}.safetensors", content_type="application/octet-stream",
                            job_id=job, epoch=epoch, is_best=epoch == 2)
        s.commit()
    rc, out, _ = run(capsys, live, keys, "jobs", "events", job, key="b")
    assert rc == 0 and "job running" in out
    rc, out, _ = run(capsys, live, keys, "jobs", "checkpoints", job, "--json", key="b")
    assert [c["epoch"] for c in json.loads(out)] == [1, 2]
    rc, out, _ = run(capsys, live, keys, "jobs", "download", job, "--epoch", "1", "--out", str(tmp_path / "e1"),
                     key="b")
    assert rc == 0 and (tmp_path / "e1" / "epoch_1.safetensors").read_bytes() == safetensors_bytes(seed=1)
    rc, _, err = run(capsys, live, keys, "jobs", "download", job, "--epoch", "7", "--out", str(tmp_path / "e7"),
                     key="b")
    assert rc == 1 and "no checkpoint of epoch 7" in err
    rc, out, _ = run(capsys, live, keys, "jobs", "list", "--status", "succeeded", "--json", key="b")
    assert [j["id"] for j in json.loads(out)["data"]] == [job]
    rc, out, _ = run(capsys, live, keys, "webhooks", "list", "--json", key="b")
    assert rc == 0 and json.loads(out) == {"data": [], "has_more": False, "last_id": None}


# ------------------------------------------------------------------------------ a model's sanity check
# The worker stores it in the row's JSON (here: the engine's real check of an untrained head on digits,
# written as the worker writes it); the API answers it as `sanity_check`, never inside the caller's
# `metadata`, and only once the model is ready. (The worker's side: tests/e2e/test_embedded_e2e.py.)
@pytest.fixture(scope="module")
def check(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from core.engine.data.datasets import load_dataset

    torch.manual_seed(0)
    data = load_dataset("digits", data_dir=tmp_path_factory.mktemp("data"))
    untrained = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    return sanity_check(untrained, data, num_classes=10, input_shape=[1, 8, 8], input_mean=None, input_std=None)


def test_the_check_is_shown_by_the_api_the_sdk_and_the_cli(client, live, db, keys, capsys, check) -> None:
    assert check["status"] == "warning" and check["near_chance"]
    model_id = db.add_model(keys["a"]["id"], status="ready")
    db.update(Model, model_id, meta={"team": "vision", SANITY_CHECK_KEY: check})

    body = client.get(f"/v1/models/{model_id}", headers=keys["a"]["headers"]).json()
    assert body["metadata"] == {"team": "vision"}      # the caller's own metadata, without the check
    assert body["sanity_check"] == check
    listed = client.get("/v1/models", headers=keys["a"]["headers"]).json()["data"]
    assert next(m for m in listed if m["id"] == model_id)["sanity_check"] == check

    sdk_model = robustify.Client(live.url, api_key=keys["a"]["key"]).models.get(model_id)
    assert isinstance(sdk_model.sanity_check, robustify.SanityCheck) and sdk_model.sanity_check.warning
    assert sdk_model.sanity_check.accuracy == check["accuracy"] and sdk_model.sanity_check.n == 256
    assert [v.name for v in sdk_model.sanity_check.variants] == [v["name"] for v in check["variants"]]

    capsys.readouterr()
    assert main(["models", "get", model_id, "--url", live.url, "--key", keys["a"]["key"]]) == 0
    out = capsys.readouterr().out
    assert check["message"] in out and out.count("Warning: the model barely classifies digits.") == 1
    assert main(["models", "list", "--url", live.url, "--key", keys["a"]["key"]]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(model_id))
    assert f"acc {check['accuracy']:.3f} !" in line


def test_no_check_while_validating_and_no_metadata_made_up(client, db, keys, check) -> None:
    model_id = db.add_model(keys["a"]["id"], status="validating")
    db.update(Model, model_id, meta={SANITY_CHECK_KEY: check})   # only the worker's key: no caller metadata
    body = client.get(f"/v1/models/{model_id}", headers=keys["a"]["headers"]).json()
    assert body["sanity_check"] is None and body["metadata"] is None
    db.update(Model, model_id, status="ready")
    body = client.get(f"/v1/models/{model_id}", headers=keys["a"]["headers"]).json()
    assert body["sanity_check"]["status"] == "warning" and body["metadata"] is None
    plain = db.add_model(keys["a"]["id"], status="ready")   # validated before the check existed
    assert client.get(f"/v1/models/{plain}", headers=keys["a"]["headers"]).json()["sanity_check"] is None
