"""Index turns by (run_id, last_token_at) for the energy accountant's per-interval query.

Revision ID: 0002_turns_last_token_index
Revises: 0001_initial
Create Date: 2026-11-22
"""
from __future__ import annotations

from alembic import op

revision = "0002_turns_last_token_index"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_turns_last_token", "turns", ["run_id", "last_token_at"])


def downgrade() -> None:
    op.drop_index("ix_turns_last_token", table_name="turns")
