"""`robustify finetune` / `robustify evaluate` run the engine locally and write their outputs; the
README's local examples run here word for word."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from cli.local import _load, namespace
from core.engine.zoo import load_model_file

ROOT = Path(__file__).resolve().parents[2]


def _robustify(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ROBUSTIFY_DATA_DIR": str(cwd / "data"), "ROBUSTIFY_ALLOW_DOWNLOAD": "false"}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _readme_command(prefix: str) -> list[str]:
    """The README's shell line starting with `prefix` (backslash continuations joined), as arguments."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.strip().startswith(prefix))
    return shlex.split(line.split("#", 1)[0])[1:]          # without `.venv/bin/robustify`


def test_readme_local_finetune_then_evaluate(tmp_path: Path) -> None:
    proc = _robustify(*_readme_command(".venv/bin/robustify finetune --architecture small-cnn"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out" / "ft"
    report = json.loads((out / "report.json").read_text())
    epochs = report["config"]["epochs"]
    for name in ("best.safetensors", "last.safetensors", "training_state.safetensors", "report.json",
                 "report.png", *(f"checkpoints/epoch_{e}.safetensors" for e in range(1, epochs + 1))):
        assert (out / name).is_file(), name
    assert report["epochs_completed"] == epochs and len(report["history"]) == epochs
    assert report["config"]["threat_model"] == {"kind": "w2-linf", "delta": 0.1}
    assert (report["config"]["batch_size"], report["config"]["lr"]) == (16, 0.0025)   # auto, resolved locally
    assert report["provenance"]["model"].startswith("small-cnn pre-trained")
    # the same table as the service's: every robust accuracy with its ball and radius, and the verdict
    ci = r" \[[01]\.\d{3}, [01]\.\d{3}\]"   # every accuracy with its 95 % interval, the change with its paired one
    assert re.search(rf"W2 robust accuracy\s+0\.\d{{3}}{ci}\s+0\.\d{{3}}{ci}\s+[+-]\d\.\d{{3}}( \[[^\]]+\])?\s+"
                     r"W2 ball, l-inf cost, δ=0.1", proc.stdout), proc.stdout
    assert ("IMPROVED: the best checkpoint is epoch" in proc.stdout) == report["improved"]
    assert "seed 0, inner attack W-PGD K=10" in proc.stdout          # the recipe's default inner attack
    model = load_model_file(out / "best.safetensors", "small-cnn", num_classes=10, in_channels=1, image_size=8)
    assert set(model.state_dict()) == set(load_file(str(out / "best.safetensors")))

    ev = _robustify(*_readme_command(".venv/bin/robustify evaluate --model out/ft/best.safetensors"), cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    rep = json.loads((tmp_path / "out" / "eval" / "report.json").read_text())
    assert [r["delta"] for r in rep["w2"]] == [2 / 255, 8 / 255, 0.1]
    # the headline is at the threat model's δ (the default 8/255), which is among the radii
    assert rep["summary"]["delta"] == 8 / 255 and rep["summary"]["delta_source"] == "threat_model"
    assert "headline at δ=0.03137" in ev.stdout and "W2 ball, l-inf cost, δ=0.03137" in ev.stdout
    assert (tmp_path / "out" / "eval" / "report.png").read_bytes().startswith(b"\x89PNG")


def test_a_local_run_that_cannot_help_writes_the_input_as_best(tmp_path: Path) -> None:
    from core.engine.data.datasets import load_dataset
    from core.engine.recipes.standard import train_standard
    from core.engine.zoo import create_model, save_model_file

    torch.manual_seed(0)
    data = load_dataset("digits", data_dir=tmp_path)
    upload = tmp_path / "input.safetensors"
    save_model_file(train_standard(create_model("small-cnn", num_classes=10, in_channels=1, image_size=8), data,
                                   epochs=2, seed=0), upload)
    proc = _robustify("finetune", "--model", str(upload), "--dataset", "digits", "--delta", "0.1",
                      "--set", "epochs=1", "--set", "lr=1e-9", "--set", "train_examples=400", "--set", "attack_steps=1",
                      "--set", "test_examples=100", "--set", "eval_wpgd_steps=3", "--set", "test_wpgd_steps=3",
                      "--out", str(tmp_path / "ft"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ft" / "best.safetensors").read_bytes() == upload.read_bytes()
    assert "NOT IMPROVED" in proc.stdout and "warning: no fine-tuned epoch beat the input model" in proc.stdout
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["improved"] is False and report["best_epoch"] == 0
    assert report["provenance"]["model_sha256"] == hashlib.sha256(upload.read_bytes()).hexdigest()


def test_the_seed_never_changes_the_pretrained_starting_model(tmp_path: Path) -> None:
    def start(*extra: str) -> dict[str, torch.Tensor]:
        args = namespace("finetune", ["--dataset", "digits", "--pretrain", "1", "--out", str(tmp_path),
                                      "--data-dir", str(tmp_path), *extra])
        model, _ = _load(args)
        return model.state_dict()

    one, two, other = start("--seed", "1"), start("--seed", "2"), start("--seed", "1", "--pretrain-seed", "5")
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not all(torch.equal(one[k], other[k]) for k in one)     # its own seed does change it


def test_bad_input_gives_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x80\x04not really a model")
    proc = _robustify("evaluate", "--model", str(bad), "--dataset", "digits", "--out", str(tmp_path / "o"),
                      cwd=tmp_path)
    assert proc.returncode == 1
    assert "invalid_model_file" in proc.stderr and "pickle" in proc.stderr
    proc = _robustify("finetune", "--dataset", "digits", "--set", "epochs=0", "--pretrain", "1",
                      "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode != 0 and "epochs" in proc.stderr


def test_the_result_names_its_inner_attack() -> None:
    from cli.result_table import attack_summary

    assert attack_summary({"attack_schedule": "standard", "attack_steps": 10}) == "W-PGD K=10"
    assert attack_summary({"attack_schedule": "memory", "attack_steps": 1}) == "memory, 1 step"
    assert (attack_summary({"attack_schedule": "allocate", "attack_steps": 1, "attack_overshoot": 1.5})
            == "allocate γ=1.5")
    assert (attack_summary({"attack_schedule": "allocate", "attack_steps": 3, "attack_overshoot": 2.0})
            == "allocate γ=2.0 + 2 W-PGD steps")
