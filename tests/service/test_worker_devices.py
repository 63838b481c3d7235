"""A worker's devices (issue 18 point 6): what its heartbeat states is what torch sees in a fresh
process, and a job asking for more is refused before any rank process starts."""
from __future__ import annotations

import pytest

from core.errors import ErrorCode, RobustifyError
from worker.ddp import _check_devices
from worker.devices import device_capacity


def test_the_task_process_sees_devices() -> None:
    devices, device_type = device_capacity()   # the probe's own process states the same (test_calibration.py)
    assert devices >= 1 and device_type in ("cuda", "cpu")


def test_more_devices_than_offered_fail_before_any_rank_starts() -> None:
    devices, device_type = device_capacity()
    assert _check_devices(devices) == ("nccl" if device_type == "cuda" else "gloo")
    with pytest.raises(RobustifyError) as refused:
        _check_devices(devices + 1)
    assert refused.value.code == ErrorCode.NOT_ENOUGH_DEVICES
    assert f"asks for {devices + 1} devices" in str(refused.value)
