"""The SQL ledger: turns, pins, energy samples and attributions of every conversation, append-only, UTC.

``Ledger(url)`` is the only door to the database. Callers pass and get the frozen dataclasses of
energy/records.py; SQLAlchemy stays inside this module and energy/db.py. Works on SQLite and PostgreSQL
(``postgresql+psycopg://``); several router replicas may share one PostgreSQL ledger (conversation rows are
created with INSERT .. ON CONFLICT DO NOTHING, everything else is an append).

Rows belong to a *run* (one serving session or one simulation, with its policy). A ledger object writes
into one run (``run_id``, default ``"live"``); the report queries read any set of runs.

Must not import fastapi.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Select, and_, bindparam, case, func, insert, select, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError

from energy import db
from energy.db import (
    AttributionRowModel,
    ConversationRow,
    EnergySampleRow,
    PinRow,
    PowerCapRow,
    RunRow,
    TurnRow,
)
from energy.errors import EnergyError
from energy.records import (
    DEFAULT_RUN_ID,
    AttributionRow,
    ConversationSummary,
    ConversationView,
    EnergySample,
    PinRecord,
    PowerCapRecord,
    ReportFilter,
    RunInfo,
    RunKind,
    Source,
    TurnRecord,
    TurnStatus,
    require_utc,
)

__all__ = ["Ledger", "RunView", "ConversationFacts"]


@dataclass(frozen=True, slots=True)
class RunView:
    run_id: str
    kind: str
    policy: str | None
    started_at: datetime
    label: str | None


@dataclass(frozen=True, slots=True)
class ConversationFacts:
    """One conversation of a run with its turn totals (what the reports join energy onto)."""

    run_id: str
    conversation_id: str
    policy: str | None
    created_at: datetime
    turns: int
    prompt_tokens: int
    output_tokens: int
    final_turn: int | None
    ttfet_s: float | None
    e2e_s: float | None
    ttfet_slowdown: float | None
    e2e_slowdown: float | None
    tbt_slowdown: float | None
    tiers: tuple[str, ...]  # tiers of the instances that decoded or prefilled its turns

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


def _now() -> datetime:
    return datetime.now(UTC)


class Ledger:
    """Append-only SQL ledger. ``upgrade()`` once (it is idempotent), then record and query."""

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
        self._prepared: dict[str, tuple[str, tuple[str, ...], bool, list[Any]]] = {}  # _executemany

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

    def __enter__(self) -> Ledger:
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

    # The columns of a turn row, in TurnRecord terms (record_turns).
    _TURN_COLUMNS = (
        "run_id", "conversation_id", "turn", "request_id", "instance_id", "tier", "prefill_instance_id",
        "remote_prefill", "arrival_at", "first_token_at", "last_token_at", "prompt_tokens", "cached_tokens",
        "output_tokens", "finish_reason", "is_final", "status", "policy", "prefill_cached_tokens", "tenant",
    )  # fmt: skip
    _CONV_COLUMNS = ("run_id", "id", "policy", "created_at")
    _SUMMARY_BINDS = ("b_run", "b_id", "final_turn", "ttfet_s", "e2e_s")
    _ATTR_COLUMNS = (
        "run_id", "interval_start", "interval_end", "engine_id", "tier", "conversation_id", "turn", "joules",
        "work_share", "source", "prefill_j",
    )  # fmt: skip

    def _executemany(
        self,
        conn: Connection,
        key: str,
        make: Callable[[], Any],
        names: tuple[str, ...],
        model: Any,
        rows: list[tuple[Any, ...]],
    ) -> None:
        """One DBAPI executemany of the statement ``make()`` (compiled once per ledger, cached under ``key``)
        with ``rows`` as tuples in ``names`` order (bind names; for an INSERT, column keys), each value put
        through its column's bind processor (the dialect's, UTCDateTime's; columns of ``model``, None when
        every bind is a plain value) here. Used for the rows written for
        every turn served: SQLAlchemy's per-row parameter dicts cost ~3x SQLite's own insert work (cProfile,
        batches of 500 turns, dev box)."""
        prepared = self._prepared.get(key)
        if prepared is None:
            dialect = conn.dialect
            compiled = make().compile(dialect=dialect, column_keys=list(names))
            order = tuple(compiled.positiontup or ()) if compiled.positional else names
            if set(order) != set(names):  # pragma: no cover - a dialect that names binds otherwise
                raise EnergyError(f"ledger: unexpected bind names {order} for {key} (expected {names})")
            # dialect_impl: the type as the dialect stores it (SQLite's DATETIME string format, not the
            # driver's default adapter), exactly what SQLAlchemy's own execution would bind
            cols = model.__table__.c if model is not None else {}
            procs = [
                cols[n].type.dialect_impl(dialect).bind_processor(dialect) if n in cols else None
                for n in names
            ]
            prepared = self._prepared[key] = (compiled.string, order, compiled.positional, procs)
        sql, order, positional, procs = prepared
        todo = [(i, f) for i, f in enumerate(procs) if f is not None]
        same_order = positional and order == names
        params: list[Any] = []
        for row in rows:
            vals = list(row)
            for i, f in todo:
                vals[i] = f(vals[i])
            if same_order:
                params.append(tuple(vals))
            else:
                named = dict(zip(names, vals, strict=True))
                params.append(tuple(named[k] for k in order) if positional else named)
        conn.exec_driver_sql(sql, params)

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

    # ---- turns and conversations ---------------------------------------------------------------
    def record_turn(self, rec: TurnRecord) -> None:
        self.record_turns([rec])

    def record_turns(self, recs: Sequence[TurnRecord]) -> None:
        """Append turns (one row per attempt). A duplicate request_id within the run is an error."""
        if not recs:
            return
        self._ensure_run()
        turn_rows: list[tuple[Any, ...]] = []  # in _TURN_COLUMNS order
        convs: dict[str, dict[str, Any]] = {}
        for r in recs:
            arrival = require_utc(r.arrival_at, "TurnRecord.arrival_at")
            first = require_utc(r.first_token_at, "TurnRecord.first_token_at") if r.first_token_at else None
            last = require_utc(r.last_token_at, "TurnRecord.last_token_at") if r.last_token_at else None
            policy = r.policy or self.policy
            conv = convs.setdefault(
                r.conversation_id,
                {"run_id": self.run_id, "id": r.conversation_id, "policy": policy, "created_at": arrival},
            )
            conv["created_at"] = min(conv["created_at"], arrival)
            turn_rows.append(
                (
                    self.run_id, r.conversation_id, r.turn, r.request_id, r.instance_id, r.tier,
                    r.prefill_instance_id, r.remote_prefill, arrival, first, last, r.prompt_tokens,
                    r.cached_tokens, r.output_tokens, r.finish_reason, r.is_final, str(r.status), policy,
                    r.prefill_cached_tokens, r.tenant,
                )
            )  # fmt: skip
        finals = {r.conversation_id for r in recs if r.is_final and r.status == TurnStatus.OK}
        with self._tx("recording turns") as conn:
            self._executemany(
                conn,
                "insert-conversations",
                lambda: self._insert_ignore(ConversationRow),
                self._CONV_COLUMNS,
                ConversationRow,
                [(self.run_id, cid, c["policy"], c["created_at"]) for cid, c in convs.items()],
            )
            try:
                self._executemany(
                    conn,
                    "insert-turns",
                    lambda: insert(TurnRow),
                    self._TURN_COLUMNS,
                    TurnRow,
                    turn_rows,
                )
            except IntegrityError as err:
                raise EnergyError(
                    f"a turn with one of these request_ids is already in run {self.run_id!r} "
                    f"({', '.join(sorted({r.request_id for r in recs})[:3])}...): turns are append-only; "
                    "give a retried turn a new request_id"
                ) from err
            self._refresh_summaries(conn, sorted(finals))

    def _refresh_summaries(self, conn: Connection, conversation_ids: Sequence[str]) -> None:
        """Fill final_turn / ttfet_s / e2e_s of these conversations from their turns (the latest OK final
        turn wins; times from the first turn's arrival): 1 SELECT + 1 executemany UPDATE per chunk instead
        of 2 SELECTs + 1 UPDATE per conversation. The router's one-turn conversations are all final:
        measured CPU per final turn in batches of 200 went from ~1.1 ms to ~80 us on the 2-core dev box.

        The SELECT reads the chunk's turns with one index range scan and folds them here. It used to join two
        grouped subqueries in SQL; on PostgreSQL, whose statistics do not know a run that just started, the
        planner chose a nested loop that re-aggregated one subquery per row: 355 ms per batch of 500
        one-turn conversations (EXPLAIN ANALYZE), ~1,200 conversations/s at most for the whole ledger."""
        t = TurnRow
        ok = str(TurnStatus.OK)
        for i in range(0, len(conversation_ids), 500):  # bounded IN lists (SQLite variable limits)
            chunk = conversation_ids[i : i + 500]
            rows = conn.execute(
                select(
                    t.conversation_id, t.pk, t.turn, t.arrival_at, t.first_token_at, t.last_token_at,
                    t.is_final, t.status,
                ).where(t.run_id == self.run_id, t.conversation_id.in_(chunk))
            ).all()  # fmt: skip
            first_at: dict[str, datetime] = {}
            latest: dict[str, Any] = {}  # conversation -> its OK final turn with the highest pk
            for r in rows:
                cid = r.conversation_id
                if cid not in first_at or r.arrival_at < first_at[cid]:
                    first_at[cid] = r.arrival_at
                if r.is_final and r.status == ok and (cid not in latest or r.pk > latest[cid].pk):
                    latest[cid] = r
            values = []
            for cid, r in latest.items():
                ft, lt, t0 = r.first_token_at, r.last_token_at, first_at[cid]
                values.append(
                    (
                        self.run_id,
                        cid,
                        r.turn,
                        (ft - t0).total_seconds() if ft else None,
                        (lt - t0).total_seconds() if lt else None,
                    )
                )
            if values:
                self._executemany(
                    conn,
                    "update-summaries",
                    lambda: update(ConversationRow)
                    .where(ConversationRow.run_id == bindparam("b_run"))
                    .where(ConversationRow.id == bindparam("b_id"))
                    .values(
                        final_turn=bindparam("final_turn"),
                        ttfet_s=bindparam("ttfet_s"),
                        e2e_s=bindparam("e2e_s"),
                    ),
                    self._SUMMARY_BINDS,
                    None,
                    values,
                )

    def record_conversations(self, summaries: Sequence[ConversationSummary]) -> None:
        """Create conversation rows or fill their summary columns (e.g. the simulator's slowdowns)."""
        if not summaries:
            return
        self._ensure_run()
        with self._tx("recording conversation summaries") as conn:
            conn.execute(
                self._insert_ignore(ConversationRow),
                [
                    {
                        "run_id": self.run_id,
                        "id": s.conversation_id,
                        "policy": s.policy or self.policy,
                        "created_at": require_utc(s.created_at, "ConversationSummary.created_at")
                        if s.created_at
                        else _now(),
                    }
                    for s in summaries
                ],
            )
            for s in summaries:
                values = {
                    k: getattr(s, k)
                    for k in (
                        "final_turn",
                        "ttfet_s",
                        "e2e_s",
                        "ttfet_slowdown",
                        "e2e_slowdown",
                        "tbt_slowdown",
                    )
                    if getattr(s, k) is not None
                }
                if values:
                    conn.execute(
                        update(ConversationRow)
                        .where(ConversationRow.run_id == self.run_id, ConversationRow.id == s.conversation_id)
                        .values(**values)
                    )

    def record_pin(
        self, conversation_id: str, instance_id: str, *, at: datetime | None = None, reason: str = "placed"
    ) -> None:
        """Append a pin; a re-placement is a new row (reason e.g. 'replaced: decoder d1 down')."""
        self.record_pins([PinRecord(conversation_id, instance_id, at or _now(), reason)])

    def record_pins(self, pins: Sequence[PinRecord]) -> None:
        if not pins:
            return
        self._ensure_run()
        rows = [
            {
                "run_id": self.run_id,
                "conversation_id": p.conversation_id,
                "instance_id": p.instance_id,
                "at": require_utc(p.at, "PinRecord.at"),
                "reason": p.reason,
            }
            for p in pins
        ]
        convs = {
            p.conversation_id: min(r["at"] for r in rows if r["conversation_id"] == p.conversation_id)
            for p in pins
        }
        with self._tx("recording pins") as conn:
            conn.execute(
                self._insert_ignore(ConversationRow),
                [
                    {"run_id": self.run_id, "id": cid, "policy": self.policy, "created_at": at}
                    for cid, at in convs.items()
                ],
            )
            conn.execute(insert(PinRow), rows)

    def current_pins(self) -> dict[str, str]:
        """conversation_id -> instance_id of the latest pin of every conversation in this run."""
        p = PinRow
        latest = (
            select(p.conversation_id, func.max(p.pk).label("pk"))
            .where(p.run_id == self.run_id)
            .group_by(p.conversation_id)
            .subquery()
        )
        with self._tx("reading pins") as conn:
            rows = conn.execute(
                select(p.conversation_id, p.instance_id).join(latest, p.pk == latest.c.pk)
            ).all()
        return {r.conversation_id: r.instance_id for r in rows}

    def get_conversation(self, conversation_id: str, run_id: str | None = None) -> ConversationView | None:
        run = run_id or self.run_id
        with self._tx("reading a conversation") as conn:
            c = conn.execute(
                select(ConversationRow.__table__).where(
                    ConversationRow.run_id == run, ConversationRow.id == conversation_id
                )
            ).first()
            if c is None:
                return None
            turns = conn.execute(
                select(TurnRow.__table__)
                .where(TurnRow.run_id == run, TurnRow.conversation_id == conversation_id)
                .order_by(TurnRow.pk)
            ).all()
            pins = conn.execute(
                select(PinRow.__table__)
                .where(PinRow.run_id == run, PinRow.conversation_id == conversation_id)
                .order_by(PinRow.pk)
            ).all()
        turn_recs = tuple(_turn_from_row(t) for t in turns)
        pin_recs = tuple(PinRecord(p.conversation_id, p.instance_id, p.at, p.reason) for p in pins)
        first_arrival = min((t.arrival_at for t in turn_recs), default=None)
        return ConversationView(
            conversation_id=c.id,
            run_id=c.run_id,
            policy=c.policy,
            created_at=c.created_at,
            pinned_instance_id=pin_recs[-1].instance_id if pin_recs else None,
            pins=pin_recs,
            turns=turn_recs,
            final_turn=c.final_turn,
            ttfet_s=c.ttfet_s,
            e2e_s=c.e2e_s,
            first_arrival_at=first_arrival,
            ttfet_slowdown=c.ttfet_slowdown,
            e2e_slowdown=c.e2e_slowdown,
            tbt_slowdown=c.tbt_slowdown,
        )

    # ---- energy ----------------------------------------------------------------------------------
    def record_samples(self, samples: Iterable[EnergySample]) -> int:
        rows = [
            {
                "run_id": self.run_id,
                "meter_id": s.meter_id,
                "engine_id": s.engine_id,
                "gpu_index": s.gpu_index,
                "at": require_utc(s.at, "EnergySample.at"),
                "cumulative_j": float(s.cumulative_j),
                "source": str(s.source),
            }
            for s in samples
        ]
        if not rows:
            return 0
        self._ensure_run()
        with self._tx("recording energy samples") as conn:
            conn.execute(insert(EnergySampleRow), rows)
        return len(rows)

    def record_attributions(self, rows_in: Iterable[AttributionRow]) -> int:
        rows = []
        for a in rows_in:
            if a.joules < 0 or a.work_share < 0:
                raise EnergyError(f"attribution rows must be non-negative, got {a}")
            rows.append(
                (
                    self.run_id,
                    require_utc(a.interval_start, "interval_start"),
                    require_utc(a.interval_end, "interval_end"),
                    a.engine_id,
                    a.tier,
                    a.conversation_id,
                    a.turn,
                    float(a.joules),
                    float(a.work_share),
                    str(a.source),
                    None if a.prefill_j is None else float(a.prefill_j),
                )
            )
        if not rows:
            return 0
        self._ensure_run()
        with self._tx("recording attributions") as conn:  # one row per conversation, engine and interval
            self._executemany(
                conn,
                "insert-attributions",
                lambda: insert(AttributionRowModel),
                self._ATTR_COLUMNS,
                AttributionRowModel,
                rows,
            )
        return len(rows)

    # ---- power caps (energy/power.py) ------------------------------------------------------------
    def record_power_caps(self, recs: Iterable[PowerCapRecord]) -> int:
        rows = [
            {"run_id": self.run_id, "engine_id": r.engine_id, "tier": r.tier, "event": r.event,
             "status": r.status, "at": require_utc(r.at, "PowerCapRecord.at"), "requested_w": r.requested_w,
             "applied_w": r.applied_w, "previous_w": r.previous_w, "gpu_index": r.gpu_index,
             "gpu_uuid": r.gpu_uuid, "message": r.message[:1024]}
            for r in recs
        ]  # fmt: skip
        if not rows:
            return 0
        self._ensure_run()
        with self._tx("recording power caps") as conn:
            conn.execute(insert(PowerCapRow), rows)
        return len(rows)

    def power_caps(self, flt: ReportFilter | None = None) -> list[tuple[str, PowerCapRecord]]:
        """(run_id, record) for every power-cap event at or after ``since`` and before ``until``."""
        c = PowerCapRow
        q = _time_filter(select(c.__table__).order_by(c.at, c.pk), c.at, c.at, c.run_id, flt)
        with self._tx("reading power caps") as conn:
            rows = conn.execute(q).all()
        return [
            (r.run_id, PowerCapRecord(r.engine_id, r.event, r.status, r.at, r.tier, r.requested_w,
                                      r.applied_w, r.previous_w, r.gpu_index, r.gpu_uuid, r.message))
            for r in rows
        ]  # fmt: skip

    # ---- queries for reports ---------------------------------------------------------------------
    def samples(self, meter_id: str | None = None, flt: ReportFilter | None = None) -> list[EnergySample]:
        s = EnergySampleRow
        q = select(s.__table__).order_by(s.at, s.pk)
        if meter_id is not None:
            q = q.where(s.meter_id == meter_id)
        q = _time_filter(q, s.at, s.at, s.run_id, flt)
        with self._tx("reading samples") as conn:
            rows = conn.execute(q).all()
        return [
            EnergySample(r.meter_id, r.gpu_index, r.at, r.cumulative_j, Source(r.source), r.engine_id)
            for r in rows
        ]

    def attributions(self, flt: ReportFilter | None = None) -> list[tuple[str, AttributionRow]]:
        """(run_id, row) for every attribution whose interval starts in [since, until)."""
        a = AttributionRowModel
        q = _time_filter(
            select(a.__table__).order_by(a.interval_start, a.pk),
            a.interval_start,
            a.interval_start,
            a.run_id,
            flt,
        )
        with self._tx("reading attributions") as conn:
            rows = conn.execute(q).all()
        return [
            (
                r.run_id,
                AttributionRow(
                    r.interval_start,
                    r.interval_end,
                    r.engine_id,
                    r.conversation_id,
                    r.turn,
                    r.joules,
                    r.work_share,
                    Source(r.source),
                    r.tier,
                    r.prefill_j,
                ),
            )
            for r in rows
        ]

    def conversation_energy(self, conversation_id: str) -> tuple[float, float, datetime | None]:
        """(joules, of which measured, end of the latest interval) attributed so far to ``conversation_id`` in
        this run (ix_attr_conv)."""
        a = AttributionRowModel
        q = select(
            func.coalesce(func.sum(a.joules), 0.0),
            func.coalesce(func.sum(case((a.source == str(Source.MEASURED), a.joules), else_=0.0)), 0.0),
            func.max(a.interval_end),
        ).where(a.run_id == self.run_id, a.conversation_id == conversation_id)
        with self._tx("reading a conversation's energy") as conn:
            j, measured, last = conn.execute(q).one()
        return float(j), float(measured), last

    def turns(self, flt: ReportFilter | None = None) -> list[tuple[str, TurnRecord]]:
        """(run_id, turn) for every turn that arrived in [since, until)."""
        t = TurnRow
        q = _time_filter(
            select(t.__table__).order_by(t.arrival_at, t.pk), t.arrival_at, t.arrival_at, t.run_id, flt
        )
        with self._tx("reading turns") as conn:
            rows = conn.execute(q).all()
        return [(r.run_id, _turn_from_row(r)) for r in rows]

    def turns_overlapping(
        self, start: datetime, end: datetime, *, lookback: timedelta = timedelta(hours=1)
    ) -> list[TurnRecord]:
        """OK turns of this run active in [start, end): arrived before ``end`` with their last token at or
        after ``start``; a turn with no last token counts by its first token (else arrival) and only if it
        arrived at most ``lookback`` before ``start``.

        The overlap test runs in SQL: the energy accountant calls this every interval while serving, and
        materialising every turn of the look-back window in Python cost ~20% of the router's CPU under
        load (py-spy, router benchmark)."""
        t = TurnRow
        start = require_utc(start, "start")
        end = require_utc(end, "end")
        common = (t.run_id == self.run_id, t.arrival_at < end, t.status == str(TurnStatus.OK))
        # Two index range scans instead of one scan of the whole look-back window (which grew with the
        # turn rate: ~18 ms per call at 60k turns/hour, bench in the commit): turns with a last token use
        # ix_turns_last_token; the rare ones without fall back to first token / arrival within lookback.
        ended = select(t.__table__).where(*common, t.last_token_at >= start)
        last = func.coalesce(t.first_token_at, t.arrival_at)
        unended = select(t.__table__).where(
            *common, t.last_token_at.is_(None), t.arrival_at >= start - lookback, last >= start
        )
        with self._tx("reading active turns") as conn:
            rows = [*conn.execute(ended).all(), *conn.execute(unended).all()]
        rows.sort(key=lambda r: (r.arrival_at, r.pk))
        return [_turn_from_row(r) for r in rows]

    def conversation_facts(self, flt: ReportFilter | None = None) -> list[ConversationFacts]:
        """Conversations created in [since, until) with token totals of their OK turns, one SQL round trip."""
        c, t = ConversationRow, TurnRow
        ok = and_(t.run_id == c.run_id, t.conversation_id == c.id, t.status == str(TurnStatus.OK))
        conversation_cols = (
            c.run_id,
            c.id,
            c.policy,
            c.created_at,
            c.final_turn,
            c.ttfet_s,
            c.e2e_s,
            c.ttfet_slowdown,
            c.e2e_slowdown,
            c.tbt_slowdown,
        )
        totals = (
            select(
                *conversation_cols,
                func.count(t.pk).label("n_turns"),
                func.coalesce(func.sum(t.prompt_tokens), 0).label("prompt_tokens"),
                func.coalesce(func.sum(t.output_tokens), 0).label("output_tokens"),
            )
            .select_from(c)
            .outerjoin(t, ok)
            .group_by(*conversation_cols)
            .order_by(c.created_at, c.run_id, c.id)
        )
        totals = _time_filter(totals, c.created_at, c.created_at, c.run_id, flt)
        tier_q = select(t.run_id, t.conversation_id, t.tier).where(t.tier.is_not(None)).distinct()
        with self._tx("reading conversations") as conn:
            rows = conn.execute(totals).all()
            tiers: dict[tuple[str, str], set[str]] = {}
            for r in conn.execute(tier_q):
                tiers.setdefault((r.run_id, r.conversation_id), set()).add(r.tier)
            for r in conn.execute(
                select(
                    AttributionRowModel.run_id, AttributionRowModel.conversation_id, AttributionRowModel.tier
                )
                .where(
                    AttributionRowModel.tier.is_not(None), AttributionRowModel.conversation_id.is_not(None)
                )
                .distinct()
            ):
                tiers.setdefault((r.run_id, r.conversation_id), set()).add(r.tier)
        return [
            ConversationFacts(
                run_id=r.run_id,
                conversation_id=r.id,
                policy=r.policy,
                created_at=r.created_at,
                turns=r.n_turns,
                prompt_tokens=int(r.prompt_tokens),
                output_tokens=int(r.output_tokens),
                final_turn=r.final_turn,
                ttfet_s=r.ttfet_s,
                e2e_s=r.e2e_s,
                ttfet_slowdown=r.ttfet_slowdown,
                e2e_slowdown=r.e2e_slowdown,
                tbt_slowdown=r.tbt_slowdown,
                tiers=tuple(sorted(tiers.get((r.run_id, r.id), ()))),
            )
            for r in rows
        ]


def _time_filter(q: Select[Any], start_col: Any, end_col: Any, run_col: Any, flt: ReportFilter | None) -> Any:
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
