"""jobs may write their results to a prefix in object storage (or a directory) instead of
the results database: one Parquet file per shard

Revision ID: 0014_job_output_uri
Revises: 0013_worker_clock_skew
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0014_job_output_uri"
down_revision = "0013_worker_clock_skew"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("output_uri", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "output_uri")
