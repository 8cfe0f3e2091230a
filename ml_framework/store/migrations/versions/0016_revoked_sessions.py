"""browser sessions signed out before they expired: their tokens are refused until then

Revision ID: 0016_revoked_sessions
Revises: 0015_job_callback
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0016_revoked_sessions"
down_revision = "0015_job_callback"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "revoked_sessions",
        sa.Column("token_sha256", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_revoked_sessions_expires_at", "revoked_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_revoked_sessions_expires_at", "revoked_sessions")
    op.drop_table("revoked_sessions")
