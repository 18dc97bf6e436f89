"""The ledger's foundation: the engine, error mapping, transactions and runs (energy/ledger.py composes it).

:class:`LedgerBase` holds what every part of the ledger uses: the SQLAlchemy engine of one URL, the mapping
of database errors to :class:`energy.errors.EnergyError` with how to fix them, transactions, the dialect's
``INSERT .. ON CONFLICT DO NOTHING``, and the run rows. The turn and conversation records
(energy/ledger_turns.py) and the energy, power-cap and report queries (energy/ledger_energy.py) build on it.

Must not import fastapi.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError

from energy import db
from energy.db import (
    RunRow,
)
from energy.errors import EnergyError
from energy.records import (
    DEFAULT_RUN_ID,
    ReportFilter,
    RunInfo,
    RunKind,
    TurnRecord,
    TurnStatus,
    require_utc,
)

__all__ = ["LedgerBase", "RunView"]


@dataclass(frozen=True, slots=True)
class RunView:
    run_id: str
    kind: str
    policy: str | None
    started_at: datetime
    label: str | None


def _now() -> datetime:
    return datetime.now(UTC)


class LedgerBase:
    """The engine, errors, transactions and runs of one ledger URL; writes go into run ``run_id``."""

    def __init__(
        self,
        url: str,
        *,
        run_id: str = DEFAULT_RUN_ID,
        policy: str | None = None,
        kind: RunKind = RunKind.SERVE,
    ) -> None:
        if not run_id:
            raise EnergyError("Ledger run_id must be a non-empty string")
        self.url = url
        self.run_id = run_id
        self.policy = policy
        self.kind = kind
        self._engine = db.make_engine(url)
        self._run_known = False

    # ---- lifecycle -------------------------------------------------------------------------------
    def upgrade(self) -> None:
        """Apply the Alembic migrations up to head (creates the schema on an empty database)."""
        with self._errors("migrating"):
            db.upgrade(self._engine)

    def revision(self) -> str | None:
        with self._errors("reading the schema revision"):
            return db.current_revision(self._engine)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    # ---- error mapping ---------------------------------------------------------------------------
    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        safe_url = self._engine.url.render_as_string(hide_password=True)
        try:
            yield
        except EnergyError:
            raise
        except IntegrityError as err:
            raise EnergyError(
                f"ledger {safe_url}: {doing} violates a constraint: {_first_line(err)}"
            ) from err
        except (OperationalError, ProgrammingError) as err:
            text = str(err.orig or err).lower()
            if "no such table" in text or "does not exist" in text and "relation" in text:
                raise EnergyError(
                    f"ledger {safe_url} has no schema (while {doing}). To fix: call Ledger.upgrade() "
                    "(orchestrator serve and simulate --db do it) on this database first."
                ) from err
            raise EnergyError(f"ledger {safe_url}: database error while {doing}: {_first_line(err)}") from err
        except DBAPIError as err:
            raise EnergyError(f"ledger {safe_url}: database error while {doing}: {_first_line(err)}") from err

    @contextmanager
    def _tx(self, doing: str) -> Iterator[Connection]:
        with self._errors(doing), self._engine.begin() as conn:
            yield conn

    def _insert_ignore(self, model: Any) -> Any:
        if self.dialect == "postgresql":
            return pg_dialect.insert(model).on_conflict_do_nothing()
        return sqlite_dialect.insert(model).on_conflict_do_nothing()

    # ---- runs ------------------------------------------------------------------------------------
    def start_run(self, info: RunInfo | None = None) -> None:
        """Create the run row if absent (idempotent). Recording calls do this implicitly."""
        info = info or RunInfo(self.run_id, self.kind, self.policy)
        started = require_utc(info.started_at, "RunInfo.started_at") if info.started_at else _now()
        with self._tx("starting a run") as conn:
            conn.execute(
                self._insert_ignore(RunRow),
                [
                    {
                        "id": info.run_id,
                        "kind": str(info.kind),
                        "policy": info.policy,
                        "started_at": started,
                        "label": info.label,
                    }
                ],
            )
        if info.run_id == self.run_id:
            self._run_known = True

    def _ensure_run(self) -> None:
        if not self._run_known:
            self.start_run()

    def runs(self) -> list[RunView]:
        with self._tx("listing runs") as conn:
            rows = conn.execute(select(RunRow.__table__).order_by(RunRow.started_at, RunRow.id)).all()
        return [RunView(r.id, r.kind, r.policy, r.started_at, r.label) for r in rows]


def _time_filter(q: Any, start_col: Any, end_col: Any, run_col: Any, flt: ReportFilter | None) -> Any:
    if flt is None:
        return q
    if flt.since is not None:
        q = q.where(start_col >= require_utc(flt.since, "since"))
    if flt.until is not None:
        q = q.where(end_col < require_utc(flt.until, "until"))
    if flt.run_ids:
        q = q.where(run_col.in_(flt.run_ids))
    return q


def _turn_from_row(t: Any) -> TurnRecord:
    return TurnRecord(
        conversation_id=t.conversation_id,
        turn=t.turn,
        request_id=t.request_id,
        instance_id=t.instance_id,
        arrival_at=t.arrival_at,
        first_token_at=t.first_token_at,
        last_token_at=t.last_token_at,
        prompt_tokens=t.prompt_tokens,
        output_tokens=t.output_tokens,
        finish_reason=t.finish_reason,
        is_final=t.is_final,
        status=TurnStatus(t.status),
        prefill_instance_id=t.prefill_instance_id,
        remote_prefill=t.remote_prefill,
        tier=t.tier,
        cached_tokens=t.cached_tokens,
        policy=t.policy,
        prefill_cached_tokens=t.prefill_cached_tokens,
        tenant=t.tenant,
    )


def _first_line(err: Exception) -> str:
    orig = getattr(err, "orig", None)
    return str(orig or err).strip().splitlines()[0][:300]
