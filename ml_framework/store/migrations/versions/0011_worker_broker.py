"""worker heartbeats name the broker their process listens on (password masked), so that a
producer can say when live workers listen on another broker than its job went to

Revision ID: 0011_worker_broker
Revises: 0010_data_lifecycle
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_worker_broker"
down_revision = "0010_data_lifecycle"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("workers", sa.Column("broker", sa.String(1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("broker")
