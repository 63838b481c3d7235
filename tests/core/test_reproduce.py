"""`robustify reproduce` end to end, offline: a small CIFAR-10 folder in torchvision's on-disk format
and random RobustBench weights where RobustBench keeps them.

The fine-tuning run uses Ding2020MMA (a WRN-28-4, a sixth of the paper models' size) as a cheaper
RobustBench entry: it is not one of the paper's models, so its paper cells must read n/a. The paper's
own Wang2023Better_WRN-28-10 (WRN-28-10, ~1 s per forward/backward of 4 images on one CPU core) is
measured without fine-tuning on two images, so that its row shows the paper's numbers next to ours.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.engine.recipes.reproduce import PAPER_TABLE, ReproduceOptions, check_inputs
from core.errors import DatasetUnavailable, UnsupportedArchitecture, ValidationError

CHEAP = "Ding2020MMA"
PAPER_MODEL = "Wang2023Better_WRN-28-10"
COLUMNS = ("clean ours", "clean paper", "W2 ours", "W2 paper", "l-inf ours", "l-inf paper")


def _write_cifar(root: Path, per_batch: int = 10, test: int = 8) -> Path:
    """cifar-10-batches-py/ as torchvision extracts it: pickled dicts of uint8 N×3072 rows (red, green,
    then blue planes) and a list of labels, plus batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        labels = [int(v) for v in np.arange(n) % 4]      # test images 0..3: labels 0, 1, 2, 3
        # images that depend on the label a little, so that a model can tell classes apart at all
        data = rng.integers(0, 200, size=(n, 3072), dtype=np.uint8) + np.repeat(
            np.array(labels, dtype=np.uint8)[:, None] * 5, 3072, axis=1)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data.astype(np.uint8),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {b"label_names": [c.encode() for c in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                   "horse", "ship", "truck")],
            b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


def _write_weights(model_dir: Path, name: str) -> Path:
    """Random weights of the real architecture, saved as RobustBench's files are (a torch state dict).
    The last layer's bias favours class 0 by far, so that the model answers 0 to every image and
    the numbers are known: clean accuracy = the share of label 0, and no δ = 8/255 attack flips it."""
    from core.engine.architectures.robustbench_zoo import robustbench_entry

    torch.manual_seed(0)
    model = robustbench_entry(name, dataset="cifar10", threat_model="Linf")["model"]()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias.zero_()
        last.bias[0] = 100.0
    path = model_dir / "cifar10" / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def _reproduce(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ROBUSTIFY_ALLOW_DOWNLOAD": "false", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "cli", "reproduce", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def cifar(tmp_path: Path) -> Path:
    return _write_cifar(tmp_path / "data")


def _table_rows(stdout: str, model: str) -> tuple[list[str], list[str], list[str]]:
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    before = next(line for line in lines if line.startswith(model))
    after = lines[lines.index(before) + 1]
    return header.split("  "), before.split(), after.split()


def test_reproduce_fine_tunes_and_prints_ours_next_to_the_papers(tmp_path: Path, cifar: Path) -> None:
    _write_weights(tmp_path / "models", CHEAP)
    out = tmp_path / "result.json"
    proc = _reproduce("--data-dir", str(cifar), "--model-dir", str(tmp_path / "models"), "--models", CHEAP,
                      "--n-examples", "4", "--train-examples", "20", "--epochs", "1", "--batch-size", "8",
                      "--attack-steps", "1", "--wpgd-steps", "2", "--pgd-steps", "1", "--device", "cpu",
                      "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, before, after = _table_rows(proc.stdout, CHEAP)
    for column in COLUMNS:
        assert column in proc.stdout.splitlines()[1], column
    # model, stage, then clean/W2/l-inf as (ours, paper), then our absolute W2 and l-inf accuracies
    assert before[1] == "before" and after[0] == "after"
    assert before[3] == before[5] == before[7] == "n/a" and after[2] == after[4] == after[6] == "n/a"
    for cell in before[2:7:2] + before[8:] + after[1:6:2] + after[7:]:
        assert 0.0 <= float(cell) <= 100.0, cell
    assert "Not the paper's protocol" in proc.stdout and "gain W2" in proc.stdout
    assert f"{CHEAP}: epoch 1/1: validation clean" in proc.stderr          # the run tells where it is

    result = json.loads(out.read_text())
    assert result["paper"]["reference"].startswith("X. Bai, G. He, Y. Jiang, J. Obłój")
    assert result["protocol"]["epochs"] == 1 and result["protocol"]["matches_paper_protocol"] is False
    (row,) = result["models"]
    assert row["model"] == CHEAP and row["in_paper"] is False and row["paper"] is None
    assert row["finetune"]["epochs_completed"] == 1 and row["finetune"]["config"]["attack_steps"] == 1
    for stage in ("before", "after"):
        ours = row["ours"][stage]
        assert ours["n_examples"] == 4
        for key in ("clean", "w2", "linf", "w2_accuracy", "linf_accuracy"):
            assert 0.0 <= ours[key] <= 1.0, (stage, key)
        # clean accuracy bounds both robust ones (on 4 images, in quarters)
        assert ours["w2_accuracy"] <= ours["clean"] and ours["linf_accuracy"] <= ours["clean"]
        assert ours["clean"] * 4 == round(ours["clean"] * 4)
    # the input answers class 0 everywhere, by a margin no attack at δ = 8/255 overcomes
    assert row["ours"]["before"] == {"clean": 0.25, "w2": 1.0, "linf": 1.0, "w2_accuracy": 0.25,
                                     "linf_accuracy": 0.25, "n_examples": 4, "w2_converged": True}
    # the printed percentages are the JSON's fractions
    assert float(before[2]) == pytest.approx(100 * row["ours"]["before"]["clean"], abs=0.006)
    assert float(after[5]) == pytest.approx(100 * row["ours"]["after"]["linf"], abs=0.006)


def test_a_paper_model_is_printed_next_to_the_papers_numbers(tmp_path: Path, cifar: Path) -> None:
    _write_weights(tmp_path / "models", PAPER_MODEL)
    out = tmp_path / "result.json"
    proc = _reproduce("--data-dir", str(cifar), "--model-dir", str(tmp_path / "models"), "--skip-finetune",
                      "--n-examples", "2", "--wpgd-steps", "1", "--pgd-steps", "1", "--device", "cpu",
                      "--out", str(out), cwd=tmp_path)          # the default models: the paper's known rows
    assert proc.returncode == 0, proc.stderr
    _, before, after = _table_rows(proc.stdout, PAPER_MODEL)
    paper = PAPER_TABLE[PAPER_MODEL]
    assert [before[3], before[5], before[7]] == [f"{paper['before'][k]:.2f}" for k in ("clean", "w2", "linf")]
    assert [after[2], after[4], after[6]] == [f"{paper['after'][k]:.2f}" for k in ("clean", "w2", "linf")]
    assert after[1] == after[3] == after[5] == "skipped"
    (row,) = json.loads(out.read_text())["models"]
    assert row["in_paper"] and row["paper"]["after"]["w2"] == pytest.approx(0.7721)
    assert row["ours"]["after"] is None
    assert (row["ours"]["before"]["clean"], row["ours"]["before"]["w2_accuracy"]) == (0.5, 0.5)   # labels 0, 1
    assert [before[2], before[4], before[8]] == ["50.00", "100.00", "50.00"]


def test_missing_weights_fail_clearly_before_any_work(tmp_path: Path, cifar: Path) -> None:
    proc = _reproduce("--data-dir", str(cifar), "--model-dir", str(tmp_path / "models"), "--models",
                      f"{PAPER_MODEL},{CHEAP}", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    expected = tmp_path / "models" / "cifar10" / "Linf"
    assert str(expected / f"{PAPER_MODEL}.pt") in proc.stderr and str(expected / f"{CHEAP}.pt") in proc.stderr
    assert "never downloads" in proc.stderr


def test_missing_cifar_files_and_bad_options_are_named(tmp_path: Path, cifar: Path) -> None:
    (cifar / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetUnavailable, match="missing data_batch_3"):
        check_inputs(ReproduceOptions.create(data_dir=cifar, model_dir=tmp_path))
    proc = _reproduce("--data-dir", str(cifar), "--model-dir", str(tmp_path), "--epochs", "0", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "epochs must be at least 1" in proc.stderr
    with pytest.raises(ValidationError, match="test_wpgd_steps"):
        check_inputs(ReproduceOptions.create(data_dir=cifar, model_dir=tmp_path, wpgd_steps=10**9))
    with pytest.raises(UnsupportedArchitecture, match=f"Did you mean {PAPER_MODEL}"):
        check_inputs(ReproduceOptions.create(data_dir=cifar, model_dir=tmp_path, models=("Wang2023Better_WRN-28-1",)))
