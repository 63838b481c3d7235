"""Shared test set-up: CPU-only, deterministic, quiet."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Two cores, two pytest-xdist workers, and end-to-end tests run worker processes beside them: one
# thread each avoids oversubscription, which slows tiny models down several-fold. Under xdist it is
# one thread whatever the shell says (set before anything imports torch).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ[_var] = "1"
    else:
        os.environ.setdefault(_var, "1")


# ------------------------------------------------------------------------------ pytest-xdist
# `make test` runs the suite on two workers with `--dist loadfile --no-loadscope-reorder`: a file's
# tests stay on one worker, so module-scoped fixtures (a migrated PostgreSQL database, a live server,
# Celery workers, a trained model) are built once; and workers take files in the order below, the
# long end-to-end files first, so that no long file starts last while the other worker idles.
# (xdist_group marks would be ignored: pytest-xdist 3.8's loadgroup renames nodes through an
# attribute that pytest 9 no longer reads.) Every fixture names its databases, Redis queues, ports
# and folders uniquely, so the two workers never share one.
FILE_ORDER = ("tests/e2e/", "tests/service/", "tests/docs/", "tests/core/")


def _file_rank(item: pytest.Item) -> int:
    path = item.nodeid.partition("::")[0]
    return next((i for i, prefix in enumerate(FILE_ORDER) if path.startswith(prefix)), len(FILE_ORDER))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_file_rank)   # stable: the order inside each group is kept


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
