"""Data sets: the census, images per class in each split (core/engine/data/census.py).

Data sets uploaded before this revision keep a null census (their files are not re-read here).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("datasets", sa.Column("class_counts", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:   # SQLite rebuilds the table to drop a column
        batch.drop_column("class_counts")
