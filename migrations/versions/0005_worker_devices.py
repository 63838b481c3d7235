"""Worker heartbeats: the devices one job may train on there, and their type (worker/devices.py),
so that a submit asking for more devices than any live worker offers is refused at once.

Rows written before this revision keep nulls until their worker's next heartbeat after it probed.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("worker_heartbeats", sa.Column("devices", sa.Integer(), nullable=True))
    op.add_column("worker_heartbeats", sa.Column("device_type", sa.String(length=20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("worker_heartbeats") as batch:   # SQLite rebuilds the table to drop a column
        batch.drop_column("device_type")
        batch.drop_column("devices")
