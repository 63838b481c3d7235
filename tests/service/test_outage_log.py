"""A database outage reads as one WARNING (no traceback) and one INFO in a worker's log, not an
ERROR with a traceback per heartbeat or webhook round; other failures stay ERRORs with theirs."""
import logging

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from tests.e2e.conftest import free_port
from worker.outage import OutageLog


@pytest.fixture(scope="module")
def refused() -> OperationalError:
    """A real 'connection refused' from PostgreSQL's driver (nothing listens on the port)."""
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none",
                           connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("a closed port accepted a connection")


def test_fifty_failed_rounds_of_an_outage_log_one_warning_and_one_recovery(refused, caplog):
    log = logging.getLogger("robustify.test.outage")
    outage = OutageLog("heartbeat of job_x", log)
    with caplog.at_level(logging.INFO, logger=log.name):
        for _ in range(50):
            outage.failed(refused)
        outage.succeeded()
        outage.succeeded()
    records = [r for r in caplog.records if r.name == log.name]
    assert [r.levelname for r in records] == ["WARNING", "INFO"]
    assert records[0].exc_info is None and "unreachable" in records[0].getMessage()
    assert "reachable again" in records[1].getMessage()


def test_other_failures_are_errors_with_their_traceback_every_time(caplog):
    log = logging.getLogger("robustify.test.outage2")
    outage = OutageLog("webhook dispatch", log)
    with caplog.at_level(logging.INFO, logger=log.name):
        for _ in range(3):
            try:
                raise KeyError("a bug")
            except KeyError as exc:
                outage.failed(exc)
    records = [r for r in caplog.records if r.name == log.name]
    assert [r.levelname for r in records] == ["ERROR"] * 3 and all(r.exc_info for r in records)
