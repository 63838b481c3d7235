"""`robustify finetune` / `robustify evaluate` run the engine locally and write their outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from core.zoo import load_model_file

ROOT = Path(__file__).resolve().parents[2]


def _robustify(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ROBUSTIFY_DATA_DIR": str(cwd / "data"), "ROBUSTIFY_ALLOW_DOWNLOAD": "false"}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_local_finetune_then_evaluate(tmp_path: Path) -> None:
    out = tmp_path / "ft"
    proc = _robustify("finetune", "--architecture", "small-cnn", "--dataset", "digits", "--pretrain", "8",
                      "--delta", "0.1", "--set", "epochs=2", "--set", "batch_size=128", "--set", "attack_steps=2",
                      "--set", "eval_examples=100", "--set", "eval_wpgd_steps=5", "--set", "eval_pgd_steps=3",
                      "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("best.safetensors", "last.safetensors", "training_state.safetensors", "report.json",
                 "report.png", "checkpoints/epoch_1.safetensors", "checkpoints/epoch_2.safetensors"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["epochs_completed"] == 2 and len(report["history"]) == 2
    assert report["config"]["threat_model"] == {"kind": "w2-linf", "delta": 0.1}
    assert "w2_robust_accuracy" in proc.stdout
    model = load_model_file(out / "best.safetensors", "small-cnn", num_classes=10, in_channels=1, image_size=8)
    assert set(model.state_dict()) == set(load_file(str(out / "best.safetensors")))

    ev = _robustify("evaluate", "--model", str(out / "best.safetensors"), "--architecture", "small-cnn",
                    "--dataset", "digits", "--deltas", "2/255,0.1", "--set", "wpgd_steps=10",
                    "--set", "n_examples=200", "--out", str(tmp_path / "ev"), cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert [r["delta"] for r in rep["w2"]] == [2 / 255, 0.1]
    assert rep["n_examples"] == 200
    assert (tmp_path / "ev" / "report.png").read_bytes().startswith(b"\x89PNG")


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
