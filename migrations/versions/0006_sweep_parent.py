"""Sweep jobs: a fine-tune started by a sweep names it in `parent_job_id` (indexed, so that a sweep
finds its children and the job list can show a sweep's children).

A plain id, no foreign key: jobs are never deleted, and a sweep and its children are written in one
transaction. Rows written before this revision have no parent.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("parent_job_id", sa.String(length=40), nullable=True))
    op.create_index("ix_jobs_parent_job_id", "jobs", ["parent_job_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_parent_job_id", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:   # SQLite rebuilds the table to drop a column
        batch.drop_column("parent_job_id")
