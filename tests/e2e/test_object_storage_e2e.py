"""Workers that share nothing but the database, the broker and the bucket.

The API and two workers each have their own data directory; artifacts live in an S3-compatible
server (moto's, over HTTP). A fine-tune starts on one worker, that worker is SIGKILLed, and the
other resumes from the training state in the bucket; the client downloads the result.
"""
from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import LIFECYCLE, Workers, events, submit, wait_status, wait_until
from tests.s3server import S3_ENV, bucket, s3_client

pytestmark = [pytest.mark.service, pytest.mark.timeout(240)]
PREFIX = "cluster/"


@pytest.fixture(scope="module")
def module_bucket(s3_endpoint: str) -> Iterator[str]:
    with bucket(s3_endpoint) as name:
        yield name


@pytest.fixture(scope="module")
def service_env(service_env: dict[str, str], s3_endpoint: str, module_bucket: str) -> dict[str, str]:
    """The shared e2e environment, with artifacts in the bucket (the API's data dir stays its own)."""
    return {**service_env, **S3_ENV, "ROBUSTIFY_S3_BUCKET": module_bucket, "ROBUSTIFY_S3_ENDPOINT_URL": s3_endpoint,
            "ROBUSTIFY_S3_ADDRESSING_STYLE": "path", "ROBUSTIFY_S3_PREFIX": PREFIX}


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _recorded_sha256(pg_url: str) -> set[str]:
    from sqlalchemy import select

    from core.service.db import Artifact
    from core.service.sessions import make_engine, make_sessionmaker

    engine = make_engine(pg_url)
    try:
        with make_sessionmaker(engine)() as s:
            return set(s.scalars(select(Artifact.sha256)))
    finally:
        engine.dispose()


def test_job_resumes_on_another_machine_from_the_bucket(client: httpx.Client, service_env: dict[str, str],
                                                        queues: dict[str, str], module_bucket: str, s3_endpoint: str,
                                                        ready_model: dict[str, Any], pg_url: str,
                                                        tmp_path: Path) -> None:
    """The upload was validated by another worker (the module's CPU worker), which read it from the bucket."""
    machines: dict[str, tuple[Workers, Path]] = {}
    for name in ("node-a", "node-b"):
        data_dir = tmp_path / name
        data_dir.mkdir()
        machines[name] = (Workers({**service_env, "ROBUSTIFY_DATA_DIR": str(data_dir)}, tmp_path, queues["tag"]),
                          data_dir)
    procs = {}
    try:
        for name, (w, _) in machines.items():
            procs[name] = w.start(queues["gpu"], name)
        model = ready_model
        epochs = 4
        job_id = submit(client, model["id"], epochs=epochs, **LIFECYCLE)["id"]
        wait_until(lambda: any(e["type"] == "checkpoint" for e in events(client, job_id)), 120, "the first checkpoint")

        # SIGKILL the whole worker (parent and pool child) that holds the job
        owner = client.get(f"/v1/jobs/{job_id}").json()
        assert owner["status"] == "running" and owner["attempt"] == 1
        holder = next(n for n, (w, _) in machines.items() if f"job {job_id} claimed" in w.log(procs[n]))
        other = next(n for n in machines if n != holder)
        os.killpg(procs[holder].pid, signal.SIGKILL)
        procs[holder].wait(timeout=10)
        done_before = max(e["data"]["epoch"] for e in events(client, job_id) if e["type"] == "checkpoint")
        assert done_before < epochs

        job = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 180)
        assert job["status"] == "succeeded" and job["attempt"] == 2, job
        evs = events(client, job_id)
        assert [e["data"]["epoch"] for e in evs if e["type"] == "checkpoint"] == list(range(1, epochs + 1))
        resumed = [e for e in evs if "resumed_from_epoch" in (e["data"] or {})]
        assert len(resumed) == 1 and resumed[0]["data"]["resumed_from_epoch"] >= 1
        assert f"job {job_id} claimed" in machines[other][0].log(procs[other])

        # the client downloads the best checkpoint through the API; its bytes are the bucket's object
        r = client.get(f"/v1/jobs/{job_id}/checkpoint")
        assert r.status_code == 200
        sha = hashlib.sha256(r.content).hexdigest()
        best = [c for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"] if c["is_best"]]
        assert r.headers["etag"] == f'"{sha}"' and [c["sha256"] for c in best] == [sha]
        s3 = s3_client(s3_endpoint)
        assert s3.get_object(Bucket=module_bucket, Key=f"{PREFIX}sha256/{sha[:2]}/{sha}")["Body"].read() == r.content
        (tmp_path / "best.safetensors").write_bytes(r.content)
        from core.engine.zoo import load_model_file

        load_model_file(tmp_path / "best.safetensors", "small-cnn", num_classes=10, in_channels=1, image_size=8,
                        dataset="digits")

        # shared nothing: no process kept artifacts on its own disk; the rescuing node read the model
        # and the training state from the bucket into its sha256-keyed cache
        for _, data_dir in machines.values():
            assert not _files(data_dir / "artifacts")
        assert not _files(Path(service_env["ROBUSTIFY_DATA_DIR"]) / "artifacts")
        assert model["sha256"] in {p.name for p in _files(machines[other][1] / "cache" / "blobs")}
        assert not _files(machines[other][1] / "cache" / "tmp"), "temp files were left behind"
        # the bucket holds exactly the files that rows name (superseded training states were deleted), and
        # the measurement cache's entries (worker/measurecache.py): the input model's before-measurement
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=module_bucket).get("Contents", [])}
        cached = {k for k in keys if k.startswith(f"{PREFIX}cache/measurements/")}
        assert cached, "the fine-tune kept its measurement of the input model for the next job"
        assert keys - cached == {f"{PREFIX}sha256/{h[:2]}/{h}" for h in _recorded_sha256(pg_url)}
    finally:
        for w, _ in machines.values():
            w.stop_all()


def test_job_on_two_devices_survives_a_killed_rank(client: httpx.Client, service_env: dict[str, str],
                                                   queues: dict[str, str], ready_model: dict[str, Any],
                                                   tmp_path: Path) -> None:
    """`devices: 2`: the task runs two DDP ranks (gloo on the CPU). SIGKILL one rank: the attempt ends
    cleanly (the other rank is stopped, the job is re-queued) and the next attempt resumes from the
    checkpoint in the bucket, again on two ranks."""
    data_dir = tmp_path / "node-c"
    w = Workers({**service_env, "ROBUSTIFY_DATA_DIR": str(data_dir)}, tmp_path, queues["tag"])
    try:
        w.start(queues["gpu"], "node-c")
        epochs = 3
        job_id = submit(client, ready_model["id"], epochs=epochs, devices=2, **LIFECYCLE)["id"]
        assert client.get(f"/v1/jobs/{job_id}").json()["config"]["devices"] == 2
        wait_until(lambda: any(e["type"] == "checkpoint" for e in events(client, job_id)), 150, "the first checkpoint")
        launches = [e for e in events(client, job_id) if e["type"] == "log" and "devices" in (e["data"] or {})]
        assert len(launches) == 1 and launches[0]["data"]["devices"] == 2 and launches[0]["data"]["backend"] == "gloo"
        first_ranks = [int(r.rsplit(":", 1)[1]) for r in launches[0]["data"]["ranks"]]
        os.kill(first_ranks[1], signal.SIGKILL)

        job = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, 180)
        assert job["status"] == "succeeded" and job["attempt"] == 2, job
        evs = events(client, job_id)
        ended = [e for e in evs
                 if e["type"] == "status" and e["data"].get("status") == "queued" and "reason" in e["data"]]
        assert len(ended) == 1 and "rank 1 of 2 died (signal 9)" in ended[0]["message"], ended
        launches = [e for e in evs if e["type"] == "log" and "devices" in (e["data"] or {})]
        assert len(launches) == 2  # the second attempt ran on two ranks again
        resumed = [e for e in evs if "resumed_from_epoch" in (e["data"] or {})]
        assert len(resumed) == 1 and resumed[0]["id"] > ended[0]["id"] and resumed[0]["data"]["resumed_from_epoch"] >= 1
        assert [e["data"]["epoch"] for e in evs if e["type"] == "checkpoint"] == list(range(1, epochs + 1))
        for pid in first_ranks:  # the surviving rank of the first attempt was stopped, not left running
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        assert client.get(f"/v1/jobs/{job_id}/checkpoint").status_code == 200
    finally:
        w.stop_all()
