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
# Celery workers, a trained model) are built once; and workers take files in the order below: the
# longest files first, longest to shortest (as CI's `--durations` measured them), then the rest by
# group, so that no long file starts last while the other worker idles (the Fashion-MNIST test, last
# in the old order, ran alone for its last 7 minutes).
# (xdist_group marks would be ignored: pytest-xdist 3.8's loadgroup renames nodes through an
# attribute that pytest 9 no longer reads.) Every fixture names its databases, Redis queues, ports
# and folders uniquely, so the two workers never share one.
LONGEST_FIRST = (
    "tests/e2e/test_embedded_e2e.py", "tests/e2e/test_service_e2e.py", "tests/e2e/test_examples.py",
    "tests/e2e/test_readme_example.py", "tests/e2e/test_byo_e2e.py", "tests/core/test_cli_local.py",
    "tests/core/test_fashion_mnist.py", "tests/e2e/test_object_storage_e2e.py", "tests/core/test_reproduce.py",
    "tests/e2e/test_dashboard.py", "tests/e2e/test_faults.py", "tests/e2e/test_sweep_e2e.py",
)
FILE_ORDER = ("tests/e2e/", "tests/service/", "tests/docs/", "tests/core/")


def _file_rank(item: pytest.Item) -> int:
    path = item.nodeid.partition("::")[0]
    if path in LONGEST_FIRST:
        return LONGEST_FIRST.index(path)
    group = next((i for i, prefix in enumerate(FILE_ORDER) if path.startswith(prefix)), len(FILE_ORDER))
    return len(LONGEST_FIRST) + group


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_file_rank)   # stable: the order inside each file and group is kept


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
