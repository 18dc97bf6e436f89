"""Initial ledger schema: runs, conversations, turns, pins, energy_samples, attributions.

Revision ID: 0001_initial
Revises:
Create Date: 2025-01-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from energy.db import UTCDateTime

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("policy", sa.String(64), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("label", sa.String(512), nullable=True),
    )
    op.create_table(
        "conversations",
        sa.Column("run_id", sa.String(128), primary_key=True),
        sa.Column("id", sa.String(256), primary_key=True),
        sa.Column("policy", sa.String(64), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("final_turn", sa.Integer(), nullable=True),
        sa.Column("ttfet_s", sa.Double(), nullable=True),
        sa.Column("e2e_s", sa.Double(), nullable=True),
        sa.Column("ttfet_slowdown", sa.Double(), nullable=True),
        sa.Column("e2e_slowdown", sa.Double(), nullable=True),
        sa.Column("tbt_slowdown", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_conversations_run"),
    )
    op.create_table(
        "turns",
        sa.Column("pk", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("conversation_id", sa.String(256), nullable=False),
        sa.Column("turn", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(256), nullable=False),
        sa.Column("instance_id", sa.String(128), nullable=False),
        sa.Column("tier", sa.String(128), nullable=True),
        sa.Column("prefill_instance_id", sa.String(128), nullable=True),
        sa.Column("remote_prefill", sa.Boolean(), nullable=False),
        sa.Column("arrival_at", UTCDateTime(), nullable=False),
        sa.Column("first_token_at", UTCDateTime(), nullable=True),
        sa.Column("last_token_at", UTCDateTime(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("finish_reason", sa.String(32), nullable=True),
        sa.Column("is_final", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("policy", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id", "conversation_id"], ["conversations.run_id", "conversations.id"], name="fk_turns_conv"
        ),
        sa.UniqueConstraint("run_id", "request_id", name="uq_turns_request"),
    )
    op.create_index("ix_turns_conv", "turns", ["run_id", "conversation_id", "turn"])
    op.create_index("ix_turns_arrival", "turns", ["arrival_at"])
    op.create_table(
        "pins",
        sa.Column("pk", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("conversation_id", sa.String(256), nullable=False),
        sa.Column("instance_id", sa.String(128), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("reason", sa.String(256), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id", "conversation_id"], ["conversations.run_id", "conversations.id"], name="fk_pins_conv"
        ),
    )
    op.create_index("ix_pins_conv", "pins", ["run_id", "conversation_id", "at"])
    op.create_table(
        "energy_samples",
        sa.Column("pk", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("meter_id", sa.String(128), nullable=False),
        sa.Column("engine_id", sa.String(128), nullable=True),
        sa.Column("gpu_index", sa.Integer(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("cumulative_j", sa.Double(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_samples_run"),
    )
    op.create_index("ix_samples_meter_at", "energy_samples", ["meter_id", "gpu_index", "at"])
    op.create_table(
        "attributions",
        sa.Column("pk", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("interval_start", UTCDateTime(), nullable=False),
        sa.Column("interval_end", UTCDateTime(), nullable=False),
        sa.Column("engine_id", sa.String(128), nullable=False),
        sa.Column("tier", sa.String(128), nullable=True),
        sa.Column("conversation_id", sa.String(256), nullable=True),
        sa.Column("turn", sa.Integer(), nullable=True),
        sa.Column("joules", sa.Double(), nullable=False),
        sa.Column("work_share", sa.Double(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_attr_run"),
    )
    op.create_index("ix_attr_interval", "attributions", ["interval_start"])
    op.create_index("ix_attr_conv", "attributions", ["run_id", "conversation_id"])


def downgrade() -> None:
    for table in ("attributions", "energy_samples", "pins", "turns", "conversations", "runs"):
        op.drop_table(table)
