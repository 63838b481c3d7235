"""A real S3-compatible server for the tests: moto's standalone server (HTTP on 127.0.0.1),
started as a subprocess. boto3 talks to it over the network exactly as to MinIO or AWS;
nothing in boto3 is mocked. Credentials reach boto3 the standard way, as environment variables.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.e2e.conftest import free_port

# moto accepts any credentials; they only have to be present, as with a real server.
S3_ENV = {"AWS_ACCESS_KEY_ID": "robustify-test", "AWS_SECRET_ACCESS_KEY": "robustify-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
          "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@contextmanager
def s3_server(log_path: Path) -> Iterator[str]:
    """Run moto's S3 server until the block ends; yields its endpoint URL."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"moto server exited: {log_path.read_text()[-2000:]}"
            try:
                httpx.get(f"{url}/", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise AssertionError("moto server did not start in 60 s") from None
                time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def s3_client(endpoint: str):  # noqa: ANN201 - a boto3 client
    from core.storage.s3 import make_s3_client

    return make_s3_client(endpoint, "us-east-1", "path")


@contextmanager
def bucket(endpoint: str) -> Iterator[str]:
    """A new bucket with a unique name; emptied and removed afterwards."""
    client = s3_client(endpoint)
    name = f"robustify-test-{secrets.token_hex(4)}"
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=obj["Key"])
        for up in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
        client.delete_bucket(Bucket=name)
