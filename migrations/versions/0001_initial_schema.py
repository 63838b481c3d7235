"""Initial schema: api keys, artifacts, models, datasets, jobs, job events, worker heartbeats.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# artifacts.job_id -> jobs.id closes a cycle (jobs -> models -> artifacts -> jobs): on
# PostgreSQL it is added after both tables exist; SQLite does not check it at CREATE time.
_FK_ARTIFACT_JOB = "fk_artifacts_job_id"


def _ts(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"

    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        _ts("created_at", nullable=False),
        _ts("revoked_at"),
    )
    op.create_index("ix_api_keys_prefix", "api_keys", ["prefix"])

    artifact_fks = (
        [sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=_FK_ARTIFACT_JOB, ondelete="CASCADE")]
        if sqlite else []
    )
    op.create_table(
        "artifacts",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner_key_id", sa.String(40), nullable=True),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("content_type", sa.String(100), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=True),
        sa.Column("is_best", sa.Boolean(), nullable=True),
        sa.Column("data", sa.JSON(), nullable=True),
        _ts("created_at", nullable=False),
        *artifact_fks,
    )
    op.create_index("ix_artifacts_job_id", "artifacts", ["job_id"])
    op.create_index("ix_artifacts_owner_key_id", "artifacts", ["owner_key_id"])
    op.create_index("ix_artifacts_sha256", "artifacts", ["sha256"])

    op.create_table(
        "worker_heartbeats",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("queues", sa.JSON(), nullable=True),
        _ts("started_at", nullable=False),
        _ts("heartbeat_at", nullable=False),
    )
    op.create_index("ix_worker_heartbeats_heartbeat_at", "worker_heartbeats", ["heartbeat_at"])

    op.create_table(
        "datasets",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner_key_id", sa.String(40), nullable=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("num_examples", sa.Integer(), nullable=False),
        sa.Column("num_classes", sa.Integer(), nullable=False),
        sa.Column("image_shape", sa.JSON(), nullable=False),
        sa.Column("artifact_id", sa.String(40), sa.ForeignKey("artifacts.id", ondelete="SET NULL"), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        _ts("created_at", nullable=False),
    )
    op.create_index("ix_datasets_owner_key_id", "datasets", ["owner_key_id"])

    op.create_table(
        "models",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner_key_id", sa.String(40), nullable=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("architecture", sa.String(200), nullable=False),
        sa.Column("num_classes", sa.Integer(), nullable=False),
        sa.Column("dataset", sa.String(100), nullable=False),
        sa.Column("input_shape", sa.JSON(), nullable=True),
        sa.Column("threat_model", sa.String(40), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column(
            "weights_artifact_id", sa.String(40), sa.ForeignKey("artifacts.id", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("metadata", sa.JSON(), nullable=True),
        _ts("created_at", nullable=False),
        _ts("updated_at", nullable=False),
        _ts("deleted_at"),
    )
    op.create_index("ix_models_owner_key_id", "models", ["owner_key_id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner_key_id", sa.String(40), nullable=True),
        sa.Column("type", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("model_id", sa.String(40), sa.ForeignKey("models.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("dataset", sa.String(100), nullable=False),
        sa.Column("threat_model", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(255), nullable=True),
        _ts("heartbeat_at"),
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("latest_metrics", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("resume_artifact_id", sa.String(40), nullable=True),
        _ts("created_at", nullable=False),
        _ts("started_at"),
        _ts("finished_at"),
        _ts("cancel_requested_at"),
        sa.UniqueConstraint("owner_key_id", "idempotency_key", name="uq_jobs_owner_idempotency"),
    )
    op.create_index("ix_jobs_model_id", "jobs", ["model_id"])
    op.create_index("ix_jobs_owner_created", "jobs", ["owner_key_id", "created_at"])
    # NULL owners (auth off) escape uq_jobs_owner_idempotency; this index guards them.
    no_owner = sa.text("owner_key_id IS NULL")
    op.create_index("uq_jobs_idempotency_no_owner", "jobs", ["idempotency_key"], unique=True,
                    postgresql_where=no_owner, sqlite_where=no_owner)
    op.create_index("ix_jobs_status", "jobs", ["status"])
    if not sqlite:
        op.create_foreign_key(_FK_ARTIFACT_JOB, "artifacts", "jobs", ["job_id"], ["id"], ondelete="CASCADE")

    op.create_table(
        "job_events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True,
        ),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("level", sa.String(10), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        _ts("created_at", nullable=False),
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id"])


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint(_FK_ARTIFACT_JOB, "artifacts", type_="foreignkey")
    for table in ("job_events", "jobs", "models", "datasets", "worker_heartbeats", "artifacts", "api_keys"):
        op.drop_table(table)  # dropping a table drops its indexes
