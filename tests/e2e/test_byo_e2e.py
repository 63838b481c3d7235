"""Bring your own model and data, end to end through the HTTP API on the embedded default.

timm:resnet18 (224×224) and torchvision:resnet18 (32×32), random weights saved with
safetensors.torch.save_file and registered with ImageNet's mean and std, and a timm model from a
Hugging Face cache written here (no network); an image-folder zip written with Pillow (three
classes, images of two sizes) uploaded at both sizes; one epoch of W-TRADES on a handful of
images; the fine-tune's registered model evaluated through `robustify jobs submit`; and every bad
archive refused with nothing left behind.
"""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file

from tests.archives import CLASSES, bad_archives, folder_entries, zip_bytes
from tests.core.test_hub import timm_config, write_hub_cache
from tests.e2e.conftest import EmbeddedServe, events, wait_model_ready, wait_status, wait_until

pytestmark = pytest.mark.timeout(420)

IMAGENET = {"input_mean": "0.485,0.456,0.406", "input_std": "0.229,0.224,0.225"}
ARCHIVE_CAP = 128 * 1024
HUB_REPO = "acme/tiny-resnet"
# one epoch on 6 images, the smallest attacks: the point is that every piece runs at 224×224. The
# before/after and the evaluations use the quick preset: the standard one runs APGD-T's nine targets and
# every W-PGD attack to convergence (at least 25 more steps each), most of this test's 207 s in CI for
# nothing it checks (the standard preset's own tests are in tests/core/test_evaluation_recipe.py)
TINY_FINETUNE = {"epochs": 1, "batch_size": 3, "train_examples": 6, "attack_steps": 1,
                 "validation_examples": 3, "test_examples": 3, "eval_wpgd_steps": 1, "eval_pgd_steps": 1,
                 "test_wpgd_steps": 1, "test_pgd_steps": 1, "budget_subset": 3, "evaluation": "quick"}
TINY_EVALUATE = {"n_examples": 3, "batch_size": 3, "wpgd_steps": 2, "pgd_steps": 1, "evaluation": "quick"}
THREAT = {"kind": "w2-linf", "delta": 0.03}


def _weights(tmp_path: Path) -> dict[str, Path]:
    import timm
    import torchvision

    torch.manual_seed(0)
    files = {"timm": timm.create_model("resnet18", num_classes=3),
             "torchvision": torchvision.models.resnet18(num_classes=3)}
    paths = {}
    for family, net in files.items():
        paths[family] = tmp_path / f"{family}-resnet18.safetensors"
        save_file(net.state_dict(), str(paths[family]))   # what the user's own code writes
    return paths


def _register(client: httpx.Client, path: Path, architecture: str, dataset: str, size: str) -> dict[str, Any]:
    with open(path, "rb") as fh:
        r = client.post("/v1/models", files={"file": (path.name, fh, "application/octet-stream")},
                        data={"architecture": architecture, "num_classes": "3", "dataset": dataset,
                              "input_size": size, **IMAGENET})
    assert r.status_code == 201, r.text
    return wait_model_ready(client, r.json()["id"], timeout=180)


def _upload_zip(client: httpx.Client, data: bytes, **fields: str) -> httpx.Response:
    return client.post("/v1/datasets", data=fields, files={"file": ("photos.zip", data, "application/zip")})


def _validated(client: httpx.Client, model_id: str, timeout: float = 120) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        m = client.get(f"/v1/models/{model_id}").json()
        return m if m["status"] != "validating" else None

    return wait_until(done, timeout, f"model {model_id} to be validated", interval=0.3)


def _run(client: httpx.Client, body: dict[str, Any], timeout: float = 240) -> dict[str, Any]:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = wait_status(client, r.json()["id"], {"succeeded", "failed", "cancelled"}, timeout)
    assert job["status"] == "succeeded", json.dumps(job)[:3000]
    return job


def test_own_models_and_image_folders_end_to_end(tmp_path: Path) -> None:
    paths = _weights(tmp_path)
    hf_home = tmp_path / "hf"
    write_hub_cache(hf_home, HUB_REPO,
                    {"config.json": timm_config(), "model.safetensors": paths["timm"].read_bytes()})
    env = {"HF_HOME": str(hf_home), "ROBUSTIFY_ALLOW_DOWNLOAD": "false",
           "ROBUSTIFY_MAX_ARCHIVE_BYTES": str(ARCHIVE_CAP), "ROBUSTIFY_PROGRESS_INTERVAL_SECONDS": "0.5"}
    with EmbeddedServe(tmp_path, env) as serve, httpx.Client(base_url=serve.url, timeout=60) as client:
        families = [a["id"] for a in client.get("/v1/architectures").json()["data"]]
        assert {"timm:", "torchvision:", "robustbench:", "small-cnn"} <= set(families)

        # --- data: one zip of class folders with images of two sizes, stored at 224 and at 32 ------------
        photos = zip_bytes(folder_entries(per_class=5, sizes=((40, 30), (24, 24)), root="photos/"))
        big = _upload_zip(client, photos, image_size="224")
        small = _upload_zip(client, photos, image_size="32", name="photos-32")
        assert big.status_code == small.status_code == 201, big.text + small.text
        big, small = big.json(), small.json()
        assert big["class_names"] == small["class_names"] == list(CLASSES)
        assert big["image_shape"] == [3, 224, 224] and small["image_shape"] == [3, 32, 32]
        assert big["splits"] == small["splits"] == {"train": 12, "test": 3}

        # --- bad archives: each refused with its code, nothing stored ------------------------------------
        stored = sorted((serve.data_dir / "artifacts").rglob("*"))
        for name, (code, data) in bad_archives(ARCHIVE_CAP).items():
            r = _upload_zip(client, data)
            assert r.status_code == 422 and r.json()["code"] == code, (name, r.text)
        assert sorted((serve.data_dir / "artifacts").rglob("*")) == stored
        assert len(client.get("/v1/datasets").json()["data"]) == 2

        # --- models: timm at 224, torchvision at 32, a Hub model from the local HF cache -------------------
        timm_model = _register(client, paths["timm"], "timm:resnet18", big["id"], "3,224,224")
        tv_model = _register(client, paths["torchvision"], "torchvision:resnet18", small["id"], "3,32,32")
        assert timm_model["input_mean"] == [0.485, 0.456, 0.406] and timm_model["input_size"] == [3, 224, 224]
        r = client.post("/v1/models", json={"source": "hf-hub", "name": HUB_REPO, "num_classes": 3,
                                            "dataset": small["id"]})
        assert r.status_code == 201, r.text
        hub = wait_model_ready(client, r.json()["id"], timeout=180)
        # the hub's config.json filled in what the registration left out; the weights are stored like an upload's
        assert hub["architecture"] == "timm:resnet18" and hub["input_size"] == [3, 32, 32]
        assert hub["input_mean"] == [0.5, 0.4, 0.3] and hub["sha256"]
        missing = client.post("/v1/models", json={"source": "hf-hub", "name": "acme/not-cached", "num_classes": 3,
                                                  "dataset": small["id"]}).json()
        rejected = _validated(client, missing["id"])
        assert rejected["error"]["code"] == "model_download_failed"
        assert "ROBUSTIFY_ALLOW_DOWNLOAD" in rejected["error"]["message"]
        with open(paths["timm"], "rb") as fh:   # a misspelt family name: rejected with timm's close names
            typo = client.post("/v1/models", files={"file": ("m.safetensors", fh)},
                               data={"architecture": "timm:resnet-18", "num_classes": "3", "dataset": small["id"]})
        # refused at registration once the API has listed timm's names (the catalog builds in the
        # background), else by the worker's validation: the same code and close names either way
        if typo.status_code == 422:
            code, message = typo.json()["code"], typo.json()["detail"]
        else:
            assert typo.status_code == 201, typo.text
            error = _validated(client, typo.json()["id"])["error"]
            code, message = error["code"], error["message"]
        assert code == "unsupported_architecture" and "resnet18" in message, message

        # --- one epoch of W-TRADES at 224×224: the best checkpoint becomes a model -------------------------
        ft = _run(client, {"type": "finetune", "model_id": timm_model["id"], "dataset": big["id"],
                           "threat_model": THREAT, "config": TINY_FINETUNE})
        chained_id = ft["result"]["model_id"]
        chained = client.get(f"/v1/models/{chained_id}").json()
        best = client.get(f"/v1/jobs/{ft['id']}/checkpoint")
        assert best.status_code == 200
        registered = any(e["type"] == "model" and e["data"]["model_id"] == chained_id for e in events(client, ft["id"]))
        if ft["result"]["verdict"] == "improved":   # the best checkpoint became a model
            assert chained["status"] == "ready" and chained["source"] == "job" and registered
            assert chained["parent_model_id"] == timm_model["id"] and chained["source_job_id"] == ft["id"]
            assert chained["input_size"] == [3, 224, 224] and chained["input_mean"] == timm_model["input_mean"]
            assert best.headers["etag"] == f'"{chained["sha256"]}"'
        else:   # 3 test images: no change is significant, so the input model is handed back, nothing registered
            assert chained_id == timm_model["id"] and chained["status"] == "ready" and not registered
            assert ft["result"]["improved"] is False and ft["result"]["verdict_text"]

        # --- evaluate the registered model with the CLI, as a user would ---------------------------------
        from cli.main import main as cli

        out = io.StringIO()
        with redirect_stdout(out):
            rc = cli(["jobs", "submit", "--url", serve.url, "--type", "evaluate", "--model", chained_id,
                      "--dataset", big["id"], "--delta", "0.03", "--json",
                      *[a for k, v in TINY_EVALUATE.items() for a in ("--set", f"{k}={v}")]])
        assert rc == 0, out.getvalue()
        evaluation = wait_status(client, json.loads(out.getvalue())["id"], {"succeeded", "failed"}, 240)
        assert evaluation["status"] == "succeeded", json.dumps(evaluation)[:3000]
        report = client.get(f"/v1/jobs/{evaluation['id']}/report").json()
        assert report["n_examples"] == 3 and 0.0 <= report["summary"]["w2_robust_accuracy"] <= report["clean_accuracy"]

        # --- and at 32×32: torchvision's and the Hub's resnet18 -------------------------------------------
        for model in (tv_model, hub):
            job = _run(client, {"type": "evaluate", "model_id": model["id"], "dataset": small["id"],
                                "threat_model": THREAT, "config": TINY_EVALUATE})
            assert job["result"]["summary"]["clean_accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert serve.rc == 0, serve.log()[-3000:]
