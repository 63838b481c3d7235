"""The benchmark script keeps working (its figures are read from its output, never asserted as timings)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_runs_both_sides_and_reports_ratios() -> None:
    proc = subprocess.run([sys.executable, "bench/bench_engine.py", "--cpu-tiny", "--n-eval", "64",
                           "--eval-steps", "2", "--train-batches", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("wpgd_baseline_img_steps_per_s", "wpgd_ours_img_steps_per_s", "wtrades_baseline_img_per_s",
                "wtrades_ours_kl_img_per_s"):
        assert figures[key] > 0, key
    ratio = figures["wpgd_ours_img_steps_per_s"] / figures["wpgd_baseline_img_steps_per_s"]
    assert abs(figures["wpgd_speedup"] - ratio) < 1e-9 * ratio
    assert "ratio" in proc.stdout


def test_fast_wtrades_bench_reports_ratio_accuracy_difference_and_pass_counts(tmp_path) -> None:
    out = tmp_path / "fast.json"
    proc = subprocess.run([sys.executable, "bench/fast_wtrades.py", "--datasets", "digits", "--seeds", "0",
                           "--methods", "standard-k10,memory-k1", "--epochs", "2", "--train", "256",
                           "--test-examples", "64", "--data-dir", str(tmp_path / "data"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["summary"]}
    assert rows["standard-k10"]["speedup_vs_k10"]["median"] == 1.0
    assert rows["standard-k10"]["w2_difference_vs_k10"]["median"] == 0.0
    assert (rows["standard-k10"]["passes_per_image_per_step"], rows["memory-k1"]["passes_per_image_per_step"]) == (11, 2)
    fast = [r for r in result["runs"] if r["method"] == "memory-k1"][0]
    assert fast["config"]["attack_schedule"] == "memory" and fast["config"]["attack_steps"] == 1
    assert fast["train_seconds"] > 0 and 0 <= fast["w2_robust_accuracy"] <= fast["clean_accuracy"] <= 1
    assert "| digits | memory-k1 | 2 | 2 |" in proc.stdout
