"""worker heartbeats record the worker host's clock skew against the database server
(heartbeats are stamped, and their ages measured, by the database's clock)

Revision ID: 0013_worker_clock_skew
Revises: 0012_idempotency_key
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0013_worker_clock_skew"
down_revision = "0012_idempotency_key"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("workers", sa.Column("clock_skew_s", sa.Float, nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN, also on SQLite (3.35+)
    op.drop_column("workers", "clock_skew_s")
