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
