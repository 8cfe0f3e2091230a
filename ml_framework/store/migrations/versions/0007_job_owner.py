"""the name of the API key that submitted a job (NULL: submitted from the CLI or the
Python client, or before this revision): another key's caller gets 404 for it

Revision ID: 0007_job_owner
Revises: 0006
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_job_owner"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("owner", sa.String(64), nullable=True))
    op.create_index("ix_jobs_owner", "jobs", ["owner"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner", table_name="jobs")
    # ALTER TABLE ... DROP COLUMN, also on SQLite (3.35+): a batch operation would copy
    # the jobs table and drop it, which cascades to every shard and result of every job
    op.drop_column("jobs", "owner")
