"""The README's client commands, exactly as written there, against `robustify serve` (the embedded
default): a model pre-trained like the demo's, uploaded, fine-tuned with every field but `epochs`
at its default, must come back more W2-robust on the held-out test images, with the same
before/after table as the demo; a run that cannot help must hand back the upload, byte for byte.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import EmbeddedServe, events

pytestmark = pytest.mark.timeout(420)


def robustify(url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTIFY_")}
    env.update({"ROBUSTIFY_URL": url, "PYTHONUNBUFFERED": "1"})
    proc = subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=360)
    assert proc.returncode == 0, f"robustify {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def w2_robust_accuracy(path: Path, data_dir: Path) -> float:
    """W2 robust accuracy at δ = 0.1 of a digits small-cnn file on the whole test split, by the quick
    ensemble (W-PGD with ReDLR and with cross-entropy, at least 50 steps each), measured here and not
    by the service."""
    from core.engine.config import EvaluateConfig
    from core.engine.data.datasets import load_dataset
    from core.engine.recipes.evaluate import evaluate
    from core.engine.zoo import load_model_file

    model = load_model_file(path, "small-cnn", num_classes=10, in_channels=1, image_size=8, dataset="digits")
    config = EvaluateConfig(threat_model={"kind": "w2-linf", "delta": 0.1}, linf_attacks=[], evaluation="quick")
    return float(evaluate(config, model, load_dataset("digits", data_dir=data_dir), device="cpu")
                 .summary["w2_robust_accuracy"])


def test_readme_service_example(tmp_path: Path) -> None:
    from cli.demo import _train_model

    upload = tmp_path / "model.safetensors"
    _train_model(upload, tmp_path)                       # pre-trained exactly as `robustify demo` does
    upload_sha = hashlib.sha256(upload.read_bytes()).hexdigest()
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    with EmbeddedServe(tmp_path, {"ROBUSTIFY_PROGRESS_INTERVAL_SECONDS": "0.3"}) as serve:
        url = serve.url
        # --- the README's lines, word for word (ids filled in) -------------------------------
        line = ("robustify models upload model.safetensors --architecture small-cnn --num-classes 10 "
                "--dataset digits --wait")
        assert line in readme
        out = robustify(url, *line.split()[1:], cwd=tmp_path).stdout
        model_id = re.search(r"(mdl_[0-9a-f]+)\s+ready", out).group(1)

        line = "robustify jobs submit --type finetune --model mdl_… --dataset digits --delta 0.1 --set epochs=8 --watch"
        assert line in readme
        out = robustify(url, *line.replace("mdl_…", model_id).split()[1:], cwd=tmp_path).stdout
        job_id = re.search(r"(job_[0-9a-f]+)\s+queued", out).group(1)
        # the resolved defaults are shown at submit, and the watch ends with the demo's table
        assert "epochs 8, batch_size 16, lr 0.0025, beta 6.0" in out and "inner attack W-PGD K=10" in out, out
        ci = r" \[[-+]?[01]\.\d{3}, [-+]?[01]\.\d{3}\]"   # each number's 95 % interval
        assert re.search(rf"W2 robust accuracy\s+0\.\d{{3}}{ci}\s+0\.\d{{3}}{ci}\s+\+0\.\d{{3}}{ci}\s+"
                         r"W2 ball, l-inf cost, δ=0.1", out), out
        assert "IMPROVED: the best checkpoint is epoch" in out and "NOT IMPROVED" not in out, out
        # stdout is a pipe here, as with `> file`: the demo's job in a line per phase, epoch or status
        # change (or every 30 s), each with its percentage, not a bar frame every half second
        progress = [m for m in (re.match(r"\d\d:\d\d:\d\d  (\w+)\s+(\d+)%(.*)$", line) for line in out.splitlines())
                    if m]
        assert len(out.splitlines()) < 200 and "\r" not in out, out[-3000:]
        epochs = {int(e[1]) for e in (re.search(r"  epoch (\d)/8  ", m[3]) for m in progress) if e}
        assert epochs >= set(range(1, 9)) and any("  test: " in m[3] for m in progress), out[-3000:]
        assert (progress[-1][1], progress[-1][2]) == ("succeeded", "100"), out[-3000:]

        line = "robustify jobs download job_… --out robust/"
        assert line in readme
        robustify(url, *line.replace("job_…", job_id).split()[1:], cwd=tmp_path)
        downloads = list((tmp_path / "robust").glob("*.safetensors"))
        assert len(downloads) == 1

        with httpx.Client(base_url=url, timeout=30) as client:
            job = client.get(f"/v1/jobs/{job_id}").json()
            result = job["result"]
            assert job["status"] == "succeeded" and result["improved"] is True and result["best_epoch"] >= 1
            # defaults resolved at submit: enough optimizer steps per epoch, and the values stored
            assert (job["config"]["batch_size"], job["config"]["lr"], job["config"]["epochs"]) == (16, 0.0025, 8)
            before, after = result["before"], result["after"]
            assert before["delta"] == after["delta"] == 0.1 and before["threat_model"] == "w2-linf"
            assert after["w2_robust_accuracy"] > before["w2_robust_accuracy"], (before, after)

            # report.json: the result's own field names and values, plus the per-epoch history
            report = client.get(f"/v1/jobs/{job_id}/report").json()
            for key, value in report.items():
                if key != "history":
                    assert result[key] == value, key
            assert set(result) - set(report) == {"best_checkpoint_id", "best_checkpoint_sha256", "report_id",
                                                 "plot_id", "model_id"}
            # the improved checkpoint is registered as a new model the next job can name
            assert result["model_id"].startswith("mdl_") and result["model_id"] != model_id
            prov = report["provenance"]
            assert (prov["job_id"], prov["model_id"], prov["dataset"], prov["model_sha256"]) == (
                job_id, model_id, "digits", upload_sha)
            assert prov["examples"] == {"train": 1150, "validation": 288, "test": 359, "train_available": 1438}
            assert prov["seed"] == 0 and prov["device"] == "cpu" and prov["torch_version"]
            assert prov["robustify_version"] != "unknown" and prov["evaluation_precision"] == "float32"
            assert prov["started_at"] < prov["finished_at"]
            assert report["config"] == job["config"]
            # the batch budget spent δ on average in every epoch
            ratios = [row["mean_batch_delta_ratio"] for row in report["history"]]
            assert len(ratios) == 8 and all(0.9 <= r <= 1.1 for r in ratios), ratios

        # an independent check: the downloaded checkpoint is more W2-robust than the upload (quick ensemble)
        assert w2_robust_accuracy(downloads[0], tmp_path) > w2_robust_accuracy(upload, tmp_path)

        # --- a run that cannot help: improved=false, and the download IS the upload -----------
        # (its before/after by the quick ensemble on 100 test images: what is checked is the hand-back)
        out = robustify(url, "jobs", "submit", "--type", "finetune", "--model", model_id, "--dataset", "digits",
                        "--delta", "0.1", "--set", "epochs=1", "--set", "lr=1e-9", "--set", "evaluation=quick",
                        "--set", "test_examples=100", "--watch", cwd=tmp_path).stdout
        assert "NOT IMPROVED: no fine-tuned epoch beat the input model" in out, out
        assert "warning: no fine-tuned epoch beat the input model" in out, out
        stuck_id = re.search(r"(job_[0-9a-f]+)\s+queued", out).group(1)
        with httpx.Client(base_url=url, timeout=30) as client:
            job = client.get(f"/v1/jobs/{stuck_id}").json()
            assert job["status"] == "succeeded" and job["result"]["improved"] is False
            assert job["result"]["best_epoch"] == 0 and job["result"]["after"] == job["result"]["before"]
            warnings = [e for e in events(client, stuck_id) if e["type"] == "warning"]
            assert any("no fine-tuned epoch beat the input model" in e["message"] for e in warnings), warnings
            best = client.get(f"/v1/jobs/{stuck_id}/checkpoint")
            assert best.status_code == 200 and best.content == upload.read_bytes()
            assert job["result"]["best_checkpoint_sha256"] == upload_sha
            assert job["result"]["model_id"] == model_id      # no new model: the input is handed back
            status = subprocess.run([sys.executable, "-m", "cli", "jobs", "get", stuck_id, "--url", url],
                                    capture_output=True, text=True, timeout=60)
            assert "NOT IMPROVED" in status.stdout, status.stdout
