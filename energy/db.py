"""The ledger's SQL schema (SQLAlchemy 2.0 typed models), engine creation and Alembic migrations.

SQLAlchemy models live here and in energy/ledger.py only; everything else sees the frozen dataclasses of
energy/records.py. Works on SQLite (file or memory) and PostgreSQL (``postgresql+psycopg://`` URLs).
The schema is created only by the Alembic migrations in energy/migrations (``upgrade()``); the models
below must stay in step with the newest migration (tests/energy/test_ledger.py compares them).

Tables (all timestamps UTC):
  runs            one serving session or simulation, with its policy
  conversations   one row per (run, conversation); summary columns (final turn, TTFET, slowdowns) are
                  filled in once, when the final turn or the simulator's summary arrives
  turns           append-only, one row per turn attempt
  pins            append-only; a re-placement is a new row
  conversation_heads  one row per conversation id (all runs): the last turn number given out and the
                  current pin, updated in place; router replicas on one PostgreSQL ledger decide turn
                  numbers and pins here (energy/heads.py)
  energy_samples  append-only meter readings (cumulative joules per GPU)
  attributions    append-only: interval x engine x conversation turn (conversation NULL: idle row)

Must not import fastapi.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Double,
    Engine,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool

from energy.errors import EnergyError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in, timezone-aware UTC out, on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so values are stored as naive UTC and
    re-tagged on the way out. Naive inputs are refused (they are the usual source of off-by-hours bugs).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise EnergyError(f"naive datetime {value.isoformat()} given to the ledger; attach tzinfo=UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    policy: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    label: Mapped[str | None] = mapped_column(String(512))


class ConversationRow(Base):
    __tablename__ = "conversations"
    __table_args__ = (ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_conversations_run"),)

    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    id: Mapped[str] = mapped_column(String(256), primary_key=True)
    policy: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    final_turn: Mapped[int | None] = mapped_column(Integer)
    ttfet_s: Mapped[float | None] = mapped_column(Double)
    e2e_s: Mapped[float | None] = mapped_column(Double)
    ttfet_slowdown: Mapped[float | None] = mapped_column(Double)
    e2e_slowdown: Mapped[float | None] = mapped_column(Double)
    tbt_slowdown: Mapped[float | None] = mapped_column(Double)


class TurnRow(Base):
    __tablename__ = "turns"
    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "conversation_id"], ["conversations.run_id", "conversations.id"], name="fk_turns_conv"
        ),
        UniqueConstraint("run_id", "request_id", name="uq_turns_request"),
        Index("ix_turns_conv", "run_id", "conversation_id", "turn"),
        Index("ix_turns_arrival", "arrival_at"),
        # The energy accountant asks every interval for turns that ended at or after its start.
        Index("ix_turns_last_token", "run_id", "last_token_at"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(128))
    conversation_id: Mapped[str] = mapped_column(String(256))
    turn: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str] = mapped_column(String(256))
    instance_id: Mapped[str] = mapped_column(String(128))
    tier: Mapped[str | None] = mapped_column(String(128))
    prefill_instance_id: Mapped[str | None] = mapped_column(String(128))
    remote_prefill: Mapped[bool] = mapped_column(Boolean)
    arrival_at: Mapped[datetime] = mapped_column(UTCDateTime())
    first_token_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_token_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    is_final: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(16))
    policy: Mapped[str | None] = mapped_column(String(64))
    prefill_cached_tokens: Mapped[int] = mapped_column(Integer, server_default="0")
    tenant: Mapped[str] = mapped_column(String(128), server_default="default")


class PinRow(Base):
    __tablename__ = "pins"
    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "conversation_id"], ["conversations.run_id", "conversations.id"], name="fk_pins_conv"
        ),
        Index("ix_pins_conv", "run_id", "conversation_id", "at"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(128))
    conversation_id: Mapped[str] = mapped_column(String(256))
    instance_id: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    reason: Mapped[str] = mapped_column(String(256))


class ConversationHeadRow(Base):
    """What replicas sharing the ledger agree on per conversation (migration 0006; energy/heads.py)."""

    __tablename__ = "conversation_heads"

    conversation_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    turns: Mapped[int] = mapped_column(Integer)  # the last turn number given out
    pin: Mapped[str | None] = mapped_column(String(128))  # None: not pinned
    context_tokens: Mapped[int] = mapped_column(Integer, server_default="0")  # of the last finished turn
    last_decoder: Mapped[str | None] = mapped_column(String(128))  # decoder of the last finished turn
    first_arrival_at: Mapped[datetime] = mapped_column(UTCDateTime())
    active_at: Mapped[datetime] = mapped_column(UTCDateTime())  # last turn start or end (pin TTL)
    run_id: Mapped[str | None] = mapped_column(String(128))  # run of the replica that claimed the last turn
    claimed_by: Mapped[int | None] = mapped_column(Integer)  # that replica's advisory lock key (alive?)


class EnergySampleRow(Base):
    __tablename__ = "energy_samples"
    __table_args__ = (
        ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_samples_run"),
        Index("ix_samples_meter_at", "meter_id", "gpu_index", "at"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(128))
    meter_id: Mapped[str] = mapped_column(String(128))
    engine_id: Mapped[str | None] = mapped_column(String(128))
    gpu_index: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    cumulative_j: Mapped[float] = mapped_column(Double)
    source: Mapped[str] = mapped_column(String(16))


class AttributionRowModel(Base):
    __tablename__ = "attributions"
    __table_args__ = (
        ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_attr_run"),
        Index("ix_attr_interval", "interval_start"),
        Index("ix_attr_conv", "run_id", "conversation_id"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(128))
    interval_start: Mapped[datetime] = mapped_column(UTCDateTime())
    interval_end: Mapped[datetime] = mapped_column(UTCDateTime())
    engine_id: Mapped[str] = mapped_column(String(128))
    tier: Mapped[str | None] = mapped_column(String(128))
    conversation_id: Mapped[str | None] = mapped_column(String(256))  # NULL: the engine's idle row
    turn: Mapped[int | None] = mapped_column(Integer)
    joules: Mapped[float] = mapped_column(Double)
    work_share: Mapped[float] = mapped_column(Double)
    source: Mapped[str] = mapped_column(String(16))
    prefill_j: Mapped[float | None] = mapped_column(Double)  # prefill part of joules (rest: decode)


def make_engine(url: str) -> Engine:
    """Create a SQLAlchemy engine for a ledger URL, with a clear error for a bad or unsupported URL."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise EnergyError(
            f"database URL {url!r} is not a valid SQLAlchemy URL. To fix: use sqlite:///path/ledger.db "
            "or postgresql+psycopg://user@host/db"
        ) from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise EnergyError(
            f"database URL {url!r}: backend {backend!r} is not supported; use sqlite or postgresql"
        )
    if backend == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver we install
    kwargs: dict[str, Any] = {"future": True}
    if backend == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        if parsed.database in (None, "", ":memory:"):
            kwargs["poolclass"] = StaticPool  # one shared in-memory database for the whole process
        elif parsed.database:
            parent = Path(parsed.database).expanduser().resolve().parent
            if not parent.is_dir():
                raise EnergyError(
                    f"database URL {url!r}: directory {str(parent)!r} does not exist. "
                    "To fix: create it first."
                )
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except ModuleNotFoundError as err:
        raise EnergyError(
            f"database URL {url!r} needs the {err.name!r} driver. To fix: pip install 'conserve[postgres]'"
        ) from None
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    # Write-ahead log for a file database: the server's readers (GET /v1/conversations, the accountant) and
    # the ledger writer process no longer block each other, and a commit costs one fsync of the log instead
    # of the rollback journal's several (benchmarks/bench_ledger.py, batches of 50: 80-82 vs 103-107 us CPU,
    # 168 vs 198-203 us elapsed per conversation). synchronous FULL: a committed row survives a power cut.
    # The mode is stored in the file; an in-memory database answers "memory".
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()


def alembic_config(engine: Engine) -> Any:
    """A programmatic Alembic Config (no alembic.ini) pointing at the packaged migrations."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the Alembic migrations up to ``revision`` (an empty database gets the whole schema)."""
    from alembic import command

    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    cfg_engine = create_engine("sqlite://")
    head = ScriptDirectory.from_config(alembic_config(cfg_engine)).get_current_head()
    cfg_engine.dispose()
    if head is None:
        raise EnergyError(f"no Alembic revisions found under {MIGRATIONS_DIR}")
    return head


class PowerCapRow(Base):
    """Power caps asked per engine GPU and what NVML did (migration 0003_power_caps)."""

    __tablename__ = "power_caps"
    __table_args__ = (
        ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_power_caps_run"),
        Index("ix_power_caps_run_engine", "run_id", "engine_id", "at"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(128))
    engine_id: Mapped[str] = mapped_column(String(128))
    tier: Mapped[str | None] = mapped_column(String(128))
    event: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    requested_w: Mapped[float | None] = mapped_column(Double)
    applied_w: Mapped[float | None] = mapped_column(Double)
    previous_w: Mapped[float | None] = mapped_column(Double)
    gpu_index: Mapped[int | None] = mapped_column(Integer)
    gpu_uuid: Mapped[str | None] = mapped_column(String(128))
    message: Mapped[str] = mapped_column(String(1024))


class ApiKeyRow(Base):
    """API keys of tenants (migration 0005_api_keys); only a SHA-256 of each key is stored
    (energy/api_keys.py)."""

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    is_admin: Mapped[bool] = mapped_column(Boolean)
    key_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    label: Mapped[str | None] = mapped_column(String(256))
