"""Worker calibrations (issue 19 point 3): the probe times the reference on this machine, the
heartbeat row carries it next to the queue names, and a finished job's kind survives the beats."""
from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from core.engine.estimate import REFERENCE
from core.service.calibration import KEPT_SAMPLES, record_kind, worker_calibrations
from core.service.db import (
    Base,
    WorkerHeartbeat,
    heartbeat_calibration,
    heartbeat_queues,
    record_worker_heartbeat,
    utcnow,
)
from worker.devices import device_capacity, probe


@pytest.fixture
def session() -> Iterator[Session]:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        yield s
    engine.dispose()


def test_the_probe_times_the_reference_on_this_device() -> None:
    found = probe()
    assert found is not None and (found["devices"], found["device_type"]) == device_capacity()
    cal = found["calibration"]
    ref = cal["reference"]
    assert cal["device_class"] == ("cpu" if found["device_type"] == "cpu" else f"cuda:{cal['device_name']}")
    assert {k: ref[k] for k in REFERENCE[found["device_type"]]} == REFERENCE[found["device_type"]]
    assert ref["params"] > 1000 and 0 < ref["seconds_per_unit"] < 1.0


def test_the_heartbeat_keeps_queues_calibration_and_kinds(session: Session) -> None:
    cal = {"device_class": "cpu", "reference": {"seconds_per_unit": 1e-3, "params": 47818, "input_shape": [3, 32, 32]}}
    record_worker_heartbeat(session, "w1@host", ["gpu", "cpu"])
    session.commit()
    row = session.get(WorkerHeartbeat, "w1@host")
    assert row.queues == ["gpu", "cpu"] and heartbeat_calibration(row) is None
    assert record_kind(session, "w1@host", "small-cnn@1x8x8", 2e-4, 3.0) is None   # not calibrated yet
    record_worker_heartbeat(session, "w1@host", ["gpu", "cpu"], (2, "cpu"), cal)
    session.commit()
    assert heartbeat_queues(row) == ["gpu", "cpu"] and heartbeat_calibration(row)["reference"] == cal["reference"]
    # a job process records its kind; the next beats (with the start calibration) keep it
    for spu, overhead in [(3e-4, 4.0), (1e-4, 2.0), (2e-4, 3.0)]:
        kind = record_kind(session, "w1@host", "small-cnn@1x8x8", spu, overhead)
        session.commit()
    assert kind is not None and kind["jobs"] == 3
    assert (kind["seconds_per_unit"], kind["overhead_seconds"]) == (2e-4, 3.0)     # the median
    record_worker_heartbeat(session, "w1@host", ["gpu", "cpu"], (2, "cpu"), cal)
    session.commit()
    assert heartbeat_calibration(row)["kinds"]["small-cnn@1x8x8"]["jobs"] == 3
    assert "gpu" in row.queues and row.devices == 2       # the admission check's reading still holds
    for _ in range(KEPT_SAMPLES + 2):
        record_kind(session, "w1@host", "small-cnn@1x8x8", 1e-3, 1.0)
    assert heartbeat_calibration(row)["kinds"]["small-cnn@1x8x8"]["seconds_per_unit"] == 1e-3
    # a process's first job (cold: the engine imported, the data read for the first time) counts only
    # until a warm one is recorded
    assert record_kind(session, "w1@host", "resnet@3x32x32", 5e-3, 9.0, warm=False)["overhead_seconds"] == 9.0
    assert record_kind(session, "w1@host", "resnet@3x32x32", 2e-3, 1.0)["overhead_seconds"] == 1.0
    assert record_kind(session, "w1@host", "resnet@3x32x32", 4e-3, 8.0, warm=False)["seconds_per_unit"] == 2e-3

    # the estimate's view: live and stale rows of the jobs' queue; rows without a calibration, and workers
    # of other queues (they never run a job), left out
    record_worker_heartbeat(session, "w2@host", ["cpu"], (2, "cpu"), {**cal, "device_class": "cuda:X"})
    record_worker_heartbeat(session, "w3@host", ["cpu"])
    record_worker_heartbeat(session, "w4@host", ["validation"], (2, "cpu"), cal)
    session.get(WorkerHeartbeat, "w2@host").heartbeat_at = utcnow() - timedelta(minutes=5)
    session.commit()
    seen = {w.worker: w for w in worker_calibrations(session, stale_seconds=60, queue="cpu")}
    assert set(seen) == {"w1@host", "w2@host"}
    assert seen["w1@host"].live and not seen["w2@host"].live and seen["w2@host"].device_class == "cuda:X"
    assert seen["w1@host"].kinds["small-cnn@1x8x8"]["jobs"] == 3 + KEPT_SAMPLES + 2
