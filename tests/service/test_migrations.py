"""The schema comes from Alembic alone: upgrade head gives exactly the models' schema, and
downgrade base removes every table, on PostgreSQL and on SQLite; rows survive 0001 → 0002 → 0001."""
from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

import migrations
from core.service.db import Base
from core.service.sessions import make_engine
from tests.service.conftest import create_pg_database, drop_pg_database


def _diff_and_tables(url: str) -> tuple[list, set[str]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return compare_metadata(ctx, Base.metadata), set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def _assert_ownerless_idempotency_index(url: str) -> None:
    """compare_metadata does not compare index predicates: check the partial index by hand."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            (index,) = [i for i in inspect(conn).get_indexes("jobs") if i["name"] == "uq_jobs_idempotency_no_owner"]
    finally:
        engine.dispose()
    assert index["unique"] and index["column_names"] == ["idempotency_key"]
    where = index["dialect_options"][f"{engine.dialect.name}_where"]
    assert str(where).strip("()").lower() == "owner_key_id is null"


def _head() -> str:
    """The newest revision of migrations/versions (every branch's migrations chain into one)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(migrations.alembic_config()).get_current_head()


def _upgrade_keeps_rows_of_0001(url: str) -> None:
    """A database at 0001 with a model and a data set upgrades with both kept, the new columns empty."""
    from sqlalchemy import text

    migrations.upgrade(url, "0001")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO models (id, name, source, architecture, num_classes, dataset, status, created_at, "
                "updated_at) VALUES ('mdl_old', 'old', 'upload', 'small-cnn', 10, 'digits', 'ready', "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
            conn.execute(text(
                "INSERT INTO datasets (id, name, status, num_examples, num_classes, image_shape, created_at) "
                "VALUES ('ds_old', 'old', 'ready', 5, 2, '[1, 8, 8]', CURRENT_TIMESTAMP)"))
        migrations.upgrade(url, "0002")
        with engine.connect() as conn:
            model = conn.execute(text("SELECT architecture, input_mean, input_std, parent_model_id, source_job_id "
                                      "FROM models WHERE id = 'mdl_old'")).one()
            dataset = conn.execute(text("SELECT num_classes, class_names, splits FROM datasets")).one()
        assert tuple(model) == ("small-cnn", None, None, None, None)
        assert tuple(dataset) == (2, None, None)
        migrations.downgrade(url, "0001")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id FROM models")).scalar_one() == "mdl_old"
            assert "input_mean" not in {c["name"] for c in inspect(conn).get_columns("models")}
        migrations.downgrade(url)
    finally:
        engine.dispose()


def _roundtrip(url: str) -> None:
    assert migrations.current(url) is None
    _upgrade_keeps_rows_of_0001(url)
    migrations.upgrade(url)
    diff, tables = _diff_and_tables(url)
    assert diff == []
    assert tables == set(Base.metadata.tables) | {"alembic_version"}
    assert migrations.current(url) == _head()
    _assert_ownerless_idempotency_index(url)
    migrations.downgrade(url)
    diff, tables = _diff_and_tables(url)
    assert tables <= {"alembic_version"}
    assert len(diff) >= len(Base.metadata.tables)  # every table is now missing
    migrations.upgrade(url)  # and it can come back
    assert _diff_and_tables(url)[0] == []


def test_postgresql_upgrade_matches_models_and_downgrade_empties():
    name, url = create_pg_database()
    try:
        _roundtrip(url)
    finally:
        drop_pg_database(name)


def test_sqlite_upgrade_matches_models_and_downgrade_empties(tmp_path):
    _roundtrip(f"sqlite:///{tmp_path / 'nested' / 'r.db'}")


@pytest.mark.parametrize("cwd", ["/", None])
def test_alembic_command_line_from_any_directory(tmp_path, cwd):
    """`alembic -c <repo>/alembic.ini upgrade head` works, reading the URL from ROBUSTIFY_DATABASE_URL."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {"ROBUSTIFY_DATABASE_URL": url, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-m", "alembic", "-c", str(root / "alembic.ini"), "upgrade", "head"],
                         cwd=cwd or root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert migrations.current(url) == _head()
