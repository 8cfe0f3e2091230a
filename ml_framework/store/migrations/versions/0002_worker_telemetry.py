"""worker heartbeat telemetry; out-of-memory split counts on shards and jobs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

def worker_columns() -> tuple[sa.Column, ...]:
    """Fresh Column objects (a Column can belong to one table only)."""
    return (
        sa.Column("device_uuid", sa.String(64), nullable=True),
        sa.Column("device_name", sa.String(255), nullable=True),
        sa.Column("threads", sa.Integer, nullable=True),
        sa.Column("models", sa.Text, nullable=False, server_default="[]"),
        sa.Column("rows_done", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("rows_per_s", sa.Float, nullable=False, server_default="0"),
        sa.Column("oom_splits", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rss_bytes", sa.BigInteger, nullable=True),
        sa.Column("device_memory_used_bytes", sa.BigInteger, nullable=True),
        sa.Column("device_memory_total_bytes", sa.BigInteger, nullable=True),
        sa.Column("device_utilization_pct", sa.Float, nullable=True),
        sa.Column("device_temperature_c", sa.Float, nullable=True),
        sa.Column("device_power_w", sa.Float, nullable=True),
    )


def upgrade() -> None:
    for column in worker_columns():
        op.add_column("workers", column)
    op.add_column("shards", sa.Column("oom_splits", sa.Integer, nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("oom_splits", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("oom_splits")
    with op.batch_alter_table("shards") as batch:
        batch.drop_column("oom_splits")
    with op.batch_alter_table("workers") as batch:
        for column in worker_columns():
            batch.drop_column(column.name)
