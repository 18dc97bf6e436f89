"""Conversation heads (energy/heads.py): one row per conversation holding what router replicas sharing a
PostgreSQL ledger must agree on: the last turn number given out and the decoder the conversation is pinned to.

Existing conversations get a head from their turns (the highest turn number of any run), so numbering goes
on across the upgrade.

Revision ID: 0006_replica_conversation_heads
Revises: 0005_api_keys
Create Date: 2026-12-07
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from energy.db import UTCDateTime

revision = "0006_replica_conversation_heads"
down_revision = "0005_api_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conversation_heads",
        sa.Column("conversation_id", sa.String(256), primary_key=True),
        sa.Column("turns", sa.Integer(), nullable=False),
        sa.Column("pin", sa.String(128), nullable=True),
        sa.Column("context_tokens", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_decoder", sa.String(128), nullable=True),
        sa.Column("first_arrival_at", UTCDateTime(), nullable=False),
        sa.Column("active_at", UTCDateTime(), nullable=False),
        sa.Column("run_id", sa.String(128), nullable=True),
        sa.Column("claimed_by", sa.Integer(), nullable=True),
    )
    op.execute(
        "INSERT INTO conversation_heads (conversation_id, turns, context_tokens, first_arrival_at, active_at) "
        "SELECT conversation_id, MAX(turn), 0, MIN(arrival_at), MAX(arrival_at) FROM turns "
        "GROUP BY conversation_id"
    )


def downgrade() -> None:
    op.drop_table("conversation_heads")
