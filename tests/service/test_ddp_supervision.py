"""How the task judges its rank processes (worker/ddp.py), on real processes and report files.

The whole path (a job on two gloo ranks, one rank SIGKILLed, the job resumed) runs end to end in
tests/e2e/test_object_storage_e2e.py; here are the decisions it rests on, cheaply.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.engine.config import FinetuneConfig
from core.service.settings import Settings
from worker.ddp import _first_report, _stop, _supervise, devices_for


@dataclass
class Beat:
    lost: bool = False


def _sleeper(seconds: float = 60) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_a_killed_rank_is_blamed_and_the_others_are_stopped() -> None:
    procs = [_sleeper(), _sleeper()]
    try:
        time.sleep(0.3)
        os.kill(procs[1].pid, signal.SIGKILL)
        assert _supervise(procs, Beat()) == (1, -signal.SIGKILL)
    finally:
        t0 = time.monotonic()
        _stop(procs)
    assert all(p.returncode is not None for p in procs)
    assert procs[0].returncode == -signal.SIGTERM and time.monotonic() - t0 < 5


def test_ranks_that_all_finish_are_a_success_and_a_lost_claim_stops_them() -> None:
    done = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    assert _supervise(done, Beat()) is None
    running = [_sleeper(), _sleeper()]
    try:
        assert _supervise(running, Beat(lost=True)) is not None  # returns at once; the caller raises
    finally:
        _stop(running)


def test_the_earliest_report_is_the_cause(tmp_path: Path) -> None:
    assert _first_report(tmp_path) is None
    (tmp_path / "rank1.error.json").write_text(json.dumps({"code": "cuda_out_of_memory", "message": "oom"}))
    time.sleep(0.02)
    (tmp_path / "rank0.error.json").write_text(json.dumps({"code": "internal_error",
                                                          "message": "Connection closed by peer"}))
    assert _first_report(tmp_path) == {"code": "cuda_out_of_memory", "message": "oom"}


def test_devices_come_from_the_job_or_the_worker() -> None:
    worker = Settings(devices_per_job=4)
    assert devices_for(worker, "finetune", {"devices": 2}) == 2
    assert devices_for(worker, "finetune", {}) == 4
    assert devices_for(Settings(), "finetune", {"devices": None}) == 1
    assert devices_for(worker, "evaluate", {"devices": 2}) == 1  # evaluations run on one device
    assert FinetuneConfig(batch_size=96, devices=3).devices == 3
    with pytest.raises(ValueError, match="batch_size 100 must be a multiple of devices 3"):
        FinetuneConfig(batch_size=100, devices=3)


def test_work_folders_of_dead_processes_are_cleared(tmp_path: Path) -> None:
    from worker.ddp import _work_dir

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"pid{gone.pid}-abc"
    stale.mkdir()
    (stale / "rendezvous").write_text("x")
    alive = tmp_path / f"pid{os.getppid()}-def"   # a live process (this test's parent)
    alive.mkdir()
    mine = _work_dir(tmp_path)
    assert mine.parent == tmp_path and mine.name.startswith(f"pid{os.getpid()}-") and mine.is_dir()
    assert not stale.exists() and alive.exists()
