"""Shared test set-up: CPU-only, deterministic, quiet."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Two cores, and end-to-end tests run worker processes beside the test process: one thread
# each avoids oversubscription, which slows tiny models down several-fold.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


# ------------------------------------------------------------------------------ object storage
@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's standalone S3 server for the whole session, with credentials in the environment."""
    from tests.s3server import S3_ENV, s3_server

    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    try:
        with s3_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
            yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[str]:
    from tests.s3server import bucket

    with bucket(s3_endpoint) as name:
        yield name
