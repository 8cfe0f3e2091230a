"""jobs may carry a callback URL: the completion event is delivered once, signed, with
retries (state, attempts, next attempt)

Revision ID: 0015_job_callback
Revises: 0014_job_output_uri
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0015_job_callback"
down_revision = "0014_job_output_uri"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("callback_url", sa.Text, nullable=True))
    op.add_column("jobs", sa.Column("callback_state", sa.String(16), nullable=True))
    op.add_column("jobs", sa.Column("callback_attempts", sa.Integer, nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("callback_next_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_callback_state", "jobs", ["callback_state"])


def downgrade() -> None:
    op.drop_index("ix_jobs_callback_state", "jobs")
    for column in ("callback_next_at", "callback_attempts", "callback_state", "callback_url"):
        op.drop_column("jobs", column)
