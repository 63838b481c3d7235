"""Bring your own model and data: the models' input contract and lineage, data sets' class names.

models: input_mean, input_std (the per-channel statistics the engine normalises with),
parent_model_id and source_job_id (a fine-tune's registered result); datasets: class_names and
splits (image-folder uploads).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_MODEL_COLUMNS = ("input_mean", "input_std", "parent_model_id", "source_job_id")
_DATASET_COLUMNS = ("class_names", "splits")


def upgrade() -> None:
    op.add_column("models", sa.Column("input_mean", sa.JSON(), nullable=True))
    op.add_column("models", sa.Column("input_std", sa.JSON(), nullable=True))
    op.add_column("models", sa.Column("parent_model_id", sa.String(40), nullable=True))
    op.add_column("models", sa.Column("source_job_id", sa.String(40), nullable=True))
    op.create_index("ix_models_parent_model_id", "models", ["parent_model_id"])
    op.create_index("ix_models_source_job_id", "models", ["source_job_id"])
    op.add_column("datasets", sa.Column("class_names", sa.JSON(), nullable=True))
    op.add_column("datasets", sa.Column("splits", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_index("ix_models_source_job_id", "models")
    op.drop_index("ix_models_parent_model_id", "models")
    # plain columns without constraints: SQLite (3.35+) drops them in place, no table rebuild
    for column in _MODEL_COLUMNS:
        op.drop_column("models", column)
    for column in _DATASET_COLUMNS:
        op.drop_column("datasets", column)
