"""the lease of a running shard (which worker process holds it, and until when), and the
message of a bulk shard, to send again should the broker lose it

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("shards", sa.Column("lease_owner", sa.String(255), nullable=True))
    op.add_column("shards", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("shards", sa.Column("message", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("shards") as batch:
        batch.drop_column("message")
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
