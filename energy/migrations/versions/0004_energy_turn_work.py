"""Turns: the prefilling instance's prefix-cache hit (what a remote prefiller computed) and the tenant billed;
attributions: the prefill part of each row's joules (energy by phase in reports).

Revision ID: 0004_energy_turn_work
Revises: 0003_power_caps
Create Date: 2026-12-07
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_energy_turn_work"
down_revision = "0003_power_caps"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.add_column(
            sa.Column("prefill_cached_tokens", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("tenant", sa.String(128), nullable=False, server_default="default"))
    with op.batch_alter_table("attributions") as batch:
        batch.add_column(sa.Column("prefill_j", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("attributions") as batch:
        batch.drop_column("prefill_j")
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("tenant")
        batch.drop_column("prefill_cached_tokens")
