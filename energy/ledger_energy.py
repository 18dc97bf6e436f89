"""The ledger's energy: meter samples, attributions, power caps, and the queries reports are built from
(energy/ledger.py composes it with the turns).

Samples, attributions and power-cap events are appended, one row each; the report queries read any set of
runs through a :class:`energy.records.ReportFilter` (time window, run ids).

Must not import fastapi.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, case, func, insert, select

from energy.db import (
    AttributionRowModel,
    ConversationRow,
    EnergySampleRow,
    PowerCapRow,
    TurnRow,
)
from energy.errors import EnergyError
from energy.ledger_base import LedgerBase, _time_filter
from energy.records import (
    AttributionRow,
    EnergySample,
    PowerCapRecord,
    ReportFilter,
    Source,
    TurnStatus,
    require_utc,
)

__all__ = ["EnergyLedger", "ConversationFacts"]


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


class EnergyLedger(LedgerBase):
    """Records and reads energy samples, attributions and power caps; the conversation facts of reports."""

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
                {
                    "run_id": self.run_id,
                    "interval_start": require_utc(a.interval_start, "interval_start"),
                    "interval_end": require_utc(a.interval_end, "interval_end"),
                    "engine_id": a.engine_id,
                    "tier": a.tier,
                    "conversation_id": a.conversation_id,
                    "turn": a.turn,
                    "joules": float(a.joules),
                    "work_share": float(a.work_share),
                    "source": str(a.source),
                    "prefill_j": None if a.prefill_j is None else float(a.prefill_j),
                }
            )
        if not rows:
            return 0
        self._ensure_run()
        with self._tx("recording attributions") as conn:  # one row per conversation, engine and interval
            conn.execute(insert(AttributionRowModel), rows)  # Core executemany
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
            for a in conn.execute(
                select(
                    AttributionRowModel.run_id, AttributionRowModel.conversation_id, AttributionRowModel.tier
                )
                .where(
                    AttributionRowModel.tier.is_not(None), AttributionRowModel.conversation_id.is_not(None)
                )
                .distinct()
            ):
                tiers.setdefault((a.run_id, a.conversation_id), set()).add(a.tier)
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
