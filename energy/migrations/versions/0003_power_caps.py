"""Power caps asked per engine GPU and what NVML did (energy/power.py): table power_caps.

Revision ID: 0003_power_caps
Revises: 0002_turns_last_token_index
Create Date: 2026-12-08
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from energy.db import UTCDateTime

revision = "0003_power_caps"
down_revision = "0002_turns_last_token_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "power_caps",
        sa.Column("pk", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("engine_id", sa.String(128), nullable=False),
        sa.Column("tier", sa.String(128), nullable=True),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("requested_w", sa.Double(), nullable=True),
        sa.Column("applied_w", sa.Double(), nullable=True),
        sa.Column("previous_w", sa.Double(), nullable=True),
        sa.Column("gpu_index", sa.Integer(), nullable=True),
        sa.Column("gpu_uuid", sa.String(128), nullable=True),
        sa.Column("message", sa.String(1024), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_power_caps_run"),
    )
    op.create_index("ix_power_caps_run_engine", "power_caps", ["run_id", "engine_id", "at"])


def downgrade() -> None:
    op.drop_index("ix_power_caps_run_engine", table_name="power_caps")
    op.drop_table("power_caps")
