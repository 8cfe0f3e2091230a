"""idempotency keys of job submissions: the key a client sent with a job and a hash of the
request it named, unique per owner (the API key's name; '' for the CLI and the Python
client), so that two submissions racing with one key record one job

Revision ID: 0012_idempotency_key
Revises: 0011_worker_broker
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_idempotency_key"
down_revision = "0011_worker_broker"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("idempotency_key", sa.String(255), nullable=True))
    op.add_column("jobs", sa.Column("request_hash", sa.String(64), nullable=True))
    # an expression index: a NULL owner (CLI, Python client) is one scope, '' (NULLs are
    # distinct in a unique index on both SQLite and PostgreSQL); jobs without a key
    # (NULL) never collide
    op.create_index("ux_jobs_idempotency_key", "jobs", [sa.text("coalesce(owner, '')"), "idempotency_key"],
                    unique=True)


def downgrade() -> None:
    op.drop_index("ux_jobs_idempotency_key", table_name="jobs")
    # ALTER TABLE ... DROP COLUMN, also on SQLite (3.35+): a batch operation would copy
    # the jobs table and drop it, which cascades to every shard and result of every job
    op.drop_column("jobs", "request_hash")
    op.drop_column("jobs", "idempotency_key")
