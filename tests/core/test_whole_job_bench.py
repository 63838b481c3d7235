"""bench/whole_job.py's bookkeeping: the phases read off a job's events, and the summary's ratios
and differences against the K = 10 job of the same seed (the timings themselves are never asserted)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import whole_job


def _event(at: float, type_: str, message: str, data: dict | None = None) -> dict:
    from datetime import UTC, datetime

    return {"created_at": datetime.fromtimestamp(at, UTC).isoformat(), "type": type_, "message": message,
            "data": data or {}}


def test_phases_split_the_wall_time_by_status_and_phase_events() -> None:
    t0 = 1_000_000.0
    events = [_event(t0 + 1, "status", "job started on w (attempt 1)", {"status": "running"}),
              _event(t0 + 3, "progress", "phase: evaluate"), _event(t0 + 4, "progress", "phase: train"),
              _event(t0 + 4.5, "metrics", "epoch 1 metrics"),                # not a phase: ignored
              _event(t0 + 9, "progress", "phase: evaluate"), _event(t0 + 10, "progress", "phase: train"),
              _event(t0 + 12, "progress", "phase: test: input model: pointwise attack")]
    phases = whole_job.phase_seconds(t0, events, t0 + 20)
    assert phases == {"queue": 1.0, "data": 2.0, "validation": 2.0, "training": 7.0, "final evaluation": 8.0}
    assert sum(phases.values()) == pytest.approx(20.0)


def _row(method: str, seed: int, wall: float, w2: float, clean: float = 0.9) -> dict:
    return {"dataset": "digits", "method": method, "seed": seed, "wall_seconds": wall,
            "phases": dict.fromkeys(whole_job.PHASES, wall / len(whole_job.PHASES)),
            "after": {"w2_robust_accuracy": w2, "clean_accuracy": clean, "n_examples": 359}}


def test_the_summary_compares_each_seed_with_its_own_k10_job() -> None:
    rows = [_row("default-k10", 0, 100.0, 0.60), _row("default-k10", 1, 120.0, 0.62),
            _row("allocate", 0, 40.0, 0.59), _row("allocate", 1, 30.0, 0.64, clean=0.88)]
    by_method = {s["method"]: s for s in whole_job.summarise(rows)}
    assert by_method["default-k10"]["speedup_vs_default_k10"] == [1.0, 1.0, 1.0]
    allocate = by_method["allocate"]
    assert allocate["speedup_vs_default_k10"] == [2.5, 3.25, 4.0]          # 100/40 and 120/30, per seed
    assert allocate["w2_diff_vs_default_k10"] == [-0.01, 0.005]            # worst seed, median
    assert allocate["clean_diff_vs_default_k10"] == [-0.02, -0.01]
    table = whole_job.table(whole_job.summarise(rows))
    assert "| digits | allocate | 35.0 | 2.50/3.25/4.00× |" in table and table.count("\n") == 3


def test_unknown_methods_and_data_sets_are_refused() -> None:
    with pytest.raises(SystemExit):
        whole_job.main(["--methods", "default-k10,k3"])


def test_each_timed_job_starts_with_an_empty_measurement_cache(tmp_path: Path) -> None:
    """The bench empties the cache where the service's worker keeps it, so that no method is timed
    with its sibling's before-measurement read back."""
    from core.service.settings import Settings
    from core.storage.artifacts import open_store
    from worker.measurecache import StoreCache

    cache = StoreCache(open_store(Settings(data_dir=tmp_path)))
    key = "ab" * 32
    cache.put(key, b"a measurement")
    assert cache.get(key) == b"a measurement"
    whole_job.empty_measurement_cache(tmp_path)
    assert cache.get(key) is None
    whole_job.empty_measurement_cache(tmp_path)          # an empty cache is no error
