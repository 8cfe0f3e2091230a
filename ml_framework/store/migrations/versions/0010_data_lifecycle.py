"""data lifecycle: tombstones of deleted jobs (so deleting is idempotent per API key) and
an index on jobs.finished_at (the retention pass looks up expired jobs by it)

Revision ID: 0010_data_lifecycle
Revises: 0009
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_data_lifecycle"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deleted_jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_deleted_jobs_deleted_at", "deleted_jobs", ["deleted_at"])
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
    op.drop_index("ix_deleted_jobs_deleted_at", table_name="deleted_jobs")
    op.drop_table("deleted_jobs")
