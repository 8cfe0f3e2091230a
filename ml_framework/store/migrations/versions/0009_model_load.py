"""how long a cold start's model load and warm-up took, per shard and per job

Revision ID: 0009
Revises: 0007_job_owner
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0007_job_owner"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("shards", sa.Column("model_load_s", sa.Float, nullable=True))
    op.add_column("jobs", sa.Column("model_load_s", sa.Float, nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35+), not a batch copy of the table: on SQLite
    # the copy drops the old table, and its foreign keys would delete every shard with it
    op.drop_column("jobs", "model_load_s")
    op.drop_column("shards", "model_load_s")
