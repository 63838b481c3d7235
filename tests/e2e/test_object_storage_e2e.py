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

import httpx
import pytest

from tests.e2e.conftest import Workers, events, submit, upload_model, wait_model_ready, wait_status, wait_until
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

    from core.db import Artifact, make_engine, make_sessionmaker

    engine = make_engine(pg_url)
    try:
        with make_sessionmaker(engine)() as s:
            return set(s.scalars(select(Artifact.sha256)))
    finally:
        engine.dispose()


def test_job_resumes_on_another_machine_from_the_bucket(client: httpx.Client, api_url: str, service_env: dict[str, str],
                                                        queues: dict[str, str], module_bucket: str,
                                                        s3_endpoint: str, digits_model_file: Path,
                                                        pg_url: str, tmp_path: Path) -> None:
    machines: dict[str, tuple[Workers, Path]] = {}
    for name in ("node-a", "node-b"):
        data_dir = tmp_path / name
        data_dir.mkdir()
        machines[name] = (Workers({**service_env, "ROBUSTIFY_DATA_DIR": str(data_dir)}, tmp_path, queues["tag"]),
                          data_dir)
    procs = {}
    try:
        for name, (w, _) in machines.items():
            procs[name] = w.start(f"{queues['gpu']},{queues['cpu']}", name)
        model = wait_model_ready(client, upload_model(client, digits_model_file)["id"])
        epochs = 4
        job_id = submit(client, model["id"], epochs=epochs)["id"]
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
        from core.zoo import load_model_file

        load_model_file(tmp_path / "best.safetensors", "small-cnn", num_classes=10, in_channels=1, image_size=8,
                        dataset="digits")

        # shared nothing: no process kept artifacts on its own disk; the rescuing node read the model
        # and the training state from the bucket into its sha256-keyed cache
        for _, data_dir in machines.values():
            assert not _files(data_dir / "artifacts")
        assert not _files(Path(service_env["ROBUSTIFY_DATA_DIR"]) / "artifacts")
        assert model["sha256"] in {p.name for p in _files(machines[other][1] / "cache" / "blobs")}
        assert not _files(machines[other][1] / "cache" / "tmp"), "temp files were left behind"
        # the bucket holds exactly the files that rows name (superseded training states were deleted)
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=module_bucket).get("Contents", [])}
        assert keys == {f"{PREFIX}sha256/{h[:2]}/{h}" for h in _recorded_sha256(pg_url)}
    finally:
        for w, _ in machines.values():
            w.stop_all()
