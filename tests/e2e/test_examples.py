"""Every script of examples/ runs, as a user runs it, against one live `robustify serve` (the embedded
default) with --quick: a subprocess in an empty folder, the server's URL in ROBUSTIFY_URL. Each
test then checks through the API that the script did what it says."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robustify import Client
from tests.e2e.conftest import ROOT, EmbeddedServe

pytestmark = pytest.mark.timeout(300)
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServe]:
    # the webhook example's receiver listens on this machine, which servers refuse unless allowed
    env = {"ROBUSTIFY_WEBHOOK_ALLOW_NETWORKS": "127.0.0.1/32", "ROBUSTIFY_PROGRESS_INTERVAL_SECONDS": "0.3"}
    with EmbeddedServe(tmp_path_factory.mktemp("examples-serve"), env) as server:
        yield server


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("empty-folder")


def run_example(serve: EmbeddedServe, cwd: Path, script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTIFY_")}
    env.update({"ROBUSTIFY_URL": serve.url, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--quick", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{script}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{serve.log()[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def model_id(serve: EmbeddedServe, workdir: Path) -> str:
    out = run_example(serve, workdir, "train_and_upload.py")
    found = re.search(r"model (mdl_[0-9a-f]+) ready", out)
    assert found, out
    return found.group(1)


def test_every_example_is_tested() -> None:
    tested = {"train_and_upload.py", "register_timm_model.py", "upload_image_folder.py", "finetune_and_download.py",
              "receive_webhook.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_train_and_upload(serve: EmbeddedServe, workdir: Path, model_id: str) -> None:
    with Client(serve.url) as client:
        model = client.models.get(model_id)
    assert (model.status, model.architecture, model.num_classes, model.dataset) == ("ready", "small-cnn", 10, "digits")
    weights = workdir / "model.safetensors"              # the README's next line uploads this file
    assert weights.is_file() and "features.0.weight" in load_file(weights)


def test_register_timm_model(serve: EmbeddedServe, tmp_path: Path) -> None:
    out = run_example(serve, tmp_path, "register_timm_model.py", "--epochs", "1")
    found = re.search(r"model (mdl_[0-9a-f]+) ready", out)
    assert found, out
    with Client(serve.url) as client:
        model = client.models.get(found.group(1))
    assert model.status == "ready" and model.architecture == "timm:test_efficientnet", model
    assert model.input_size == [1, 8, 8] and model.input_mean and model.input_std
    # the training images' statistics, stated at registration (digits: mostly dark pixels)
    assert 0.1 < model.input_mean[0] < 0.5 and 0.2 < model.input_std[0] < 0.6, (model.input_mean, model.input_std)


def test_upload_image_folder(serve: EmbeddedServe, tmp_path: Path) -> None:
    out = run_example(serve, tmp_path, "upload_image_folder.py")
    found = re.search(r"dataset (ds_[0-9a-f]+): 10 classes", out)
    assert found, out
    assert len(list((tmp_path / "digits-png").rglob("*.png"))) == 120 and (tmp_path / "digits-png.zip").is_file()
    with Client(serve.url) as client:
        dataset = client.datasets.get(found.group(1))
    assert dataset.class_names == ["eight", "five", "four", "nine", "one", "seven", "six", "three", "two", "zero"]
    assert dataset.image_shape == [1, 8, 8] and dataset.class_counts is not None
    counts = dataset.class_counts
    assert all(a + b == 12 for a, b in zip(counts["train"], counts["test"], strict=True)), counts


def test_finetune_and_download(serve: EmbeddedServe, workdir: Path, model_id: str) -> None:
    out = run_example(serve, workdir, "finetune_and_download.py", "--model", model_id, "--out", "robust")
    job_id = re.search(r"job (job_[0-9a-f]+) queued", out).group(1)
    assert re.search(r"w2_robust_accuracy: 0\.\d{3} \[.*\] \(n=100\)\s+->\s+0\.\d{3}", out), out
    # its progress, line by line: which phases it prints depends on when its polls land (a loaded machine
    # can go from epoch 0 to the final test between two, a fast one from "running 0 %" to the end), but a
    # line of the running or finished job names the epoch
    assert "verdict: " in out and re.search(r"(running|succeeded): .*epoch \d/2", out), out
    with Client(serve.url) as client:
        job = client.jobs.get(job_id)
    assert job.succeeded
    report = json.loads((workdir / "robust" / "report.json").read_text())
    assert report["type"] == "finetune" and report["provenance"]["job_id"] == job_id
    checkpoint = list((workdir / "robust").glob("*.safetensors"))
    assert len(checkpoint) == 1 and load_file(checkpoint[0]).keys() == load_file(workdir / "model.safetensors").keys()
    assert (workdir / "robust" / "report.png").read_bytes().startswith(b"\x89PNG")


def test_receive_webhook(serve: EmbeddedServe, tmp_path: Path, model_id: str) -> None:
    out = run_example(serve, tmp_path, "receive_webhook.py", "--model", model_id, "--timeout", "180")
    job_id = re.search(r"job (job_[0-9a-f]+) queued", out).group(1)
    verified = re.findall(rf"verified (job\.\w+): job {job_id}", out)
    # the script stops at the final message; job.started may come before it or, when the two are sent
    # close together, after it (docs/webhooks.md: no order is promised), when nobody listens any more
    assert verified and verified[-1] == "job.succeeded" and set(verified) <= {"job.started", "job.succeeded"}, out
    with Client(serve.url) as client:
        deliveries = client.jobs.webhook_deliveries(job_id)
        endpoints = list(client.webhooks.list())
    assert {d.event_type for d in deliveries} == {"job.started", "job.succeeded"}
    status = {d.event_type: d.status for d in deliveries}
    assert all(status[event] == "succeeded" for event in verified), deliveries
    assert not endpoints                                  # the script removed its endpoint


def test_the_readme_model_is_the_demos(tmp_path: Path) -> None:
    """The README's quick path makes its model.safetensors with train_and_upload.py --no-upload: the
    weights `robustify demo` starts from, on which the README's example is tested."""
    from cli.demo import _train_model

    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTIFY_")}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train_and_upload.py"), "--no-upload"], cwd=tmp_path,
                          env={**env, "OMP_NUM_THREADS": str(torch.get_num_threads())},   # the same sums
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "saved model.safetensors" in proc.stdout, proc.stdout + proc.stderr
    _train_model(tmp_path / "demo.safetensors", tmp_path)
    ours, demos = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "demo.safetensors")
    assert ours.keys() == demos.keys() and all(torch.equal(ours[k], demos[k]) for k in ours)
    readme = (ROOT / "README.md").read_text()
    assert "python examples/train_and_upload.py --no-upload" in readme
