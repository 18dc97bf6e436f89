"""Engine intervals into ledger rows: the step both energy drivers share; the turns' work in an interval.

``account(ledger, intervals)`` attributes every :class:`EngineInterval` (energy/attribution.py), checks
conservation and appends the rows; ``orchestrator simulate --db`` (energy/simulation.py) and ``serve``'s
accountant (energy/accountant.py, through :func:`run_energy_job`) both call it. :func:`spread_work` turns the
ledger's turn records into the tokens each processed on an engine within an interval.

Must not import fastapi.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from energy.attribution import EngineInterval, IdlePolicy, Work, attribute_all, check_conservation
from energy.ledger import Ledger
from energy.records import EnergySample, TurnRecord


# ---- the one shared step ------------------------------------------------------------------------------
def account(ledger: Ledger, intervals: Sequence[EngineInterval], idle: IdlePolicy = IdlePolicy.ROW) -> int:
    """Attribute ``intervals``, check conservation, append the rows; returns the number of rows written."""
    rows = attribute_all(intervals, idle)
    check_conservation(intervals, rows)
    return ledger.record_attributions(rows)


class TurnSource(Protocol):
    def turns_overlapping(self, start: datetime, end: datetime) -> Sequence[TurnRecord]: ...


class LedgerTurnSource:
    """Turns of the serving run that overlap [start, end), read from the ledger."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def turns_overlapping(self, start: datetime, end: datetime) -> Sequence[TurnRecord]:
        # A turn overlaps when it arrived before `end` and its last token is at or after `start`; reading
        # the turns that arrived in the last hour before `end` bounds the query (filtered in SQL).
        return self.ledger.turns_overlapping(start, end, lookback=timedelta(hours=1))


def spread_work(turns: Sequence[TurnRecord], engine_id: str, start: datetime, end: datetime) -> list[Work]:
    """Tokens each turn processed on ``engine_id`` within [start, end), assuming uniform progress:
    prefill over [arrival, first token) -- on a remote prefiller the tokens it computed (prompt - its own
    prefix-cache hit, ``prefill_cached_tokens``), on the decoder the tokens it computed (prompt - what it had
    cached or received by KV transfer, ``cached_tokens``) -- and decode (output tokens) over [first token,
    last token] on the decoding instance."""
    out: list[Work] = []
    for t in turns:
        first = t.first_token_at or t.arrival_at
        last = t.last_token_at or first
        remote = t.prefill_instance_id if t.remote_prefill and t.prefill_instance_id else None
        pre = 0.0
        if remote == engine_id:
            computed = max(t.prompt_tokens - t.prefill_cached_tokens, 0)
            pre += computed * _overlap(t.arrival_at, first, start, end)
        if t.instance_id == engine_id:
            pre += max(t.prompt_tokens - t.cached_tokens, 0) * _overlap(t.arrival_at, first, start, end)
        dec = t.output_tokens * _overlap(first, last, start, end) if t.instance_id == engine_id else 0.0
        if pre > 0 or dec > 0:
            out.append(Work(t.conversation_id, t.turn, pre, dec))
    return out


def _overlap(a: datetime, b: datetime, start: datetime, end: datetime) -> float:
    """Fraction of [a, b] inside [start, end); a point (a == b) counts wholly where it falls."""
    if b <= a:
        return 1.0 if start <= a < end else 0.0
    lo, hi = max(a, start), min(b, end)
    return max((hi - lo).total_seconds(), 0.0) / (b - a).total_seconds()


@dataclass(frozen=True, slots=True)
class EnergyJob:
    """One tick's ledger work, handed to the ledger writer (``EnergyAccountant.offload``): meter samples to
    append and metered engine intervals to attribute. The writer runs it after every record queued before
    it is written, so the turns the intervals need are in the ledger without a flush round trip; and the SQL
    (reading turns back, ~15% of the serving process's CPU under load when it ran there) leaves the
    serving process with the ledger writer. The intervals' ``work`` is filled in from the ledger's turns
    when the job runs."""

    samples: tuple[EnergySample, ...]
    intervals: tuple[EngineInterval, ...]
    idle: IdlePolicy = IdlePolicy.ROW


def run_energy_job(ledger: Ledger, job: EnergyJob, turns: TurnSource | None = None) -> tuple[int, int]:
    """Append the job's samples, attribute its intervals with the turns that overlapped them. Returns
    (samples written, attribution rows written). The one attribution path of `serve`, wherever it runs."""
    n_samples = ledger.record_samples(job.samples) if job.samples else 0
    n_rows = 0
    if job.intervals:
        lo, hi = min(i.start for i in job.intervals), max(i.end for i in job.intervals)
        overlapping = (turns or LedgerTurnSource(ledger)).turns_overlapping(lo, hi)
        intervals = [
            dataclasses.replace(i, work=tuple(spread_work(overlapping, i.engine_id, i.start, i.end)))
            for i in job.intervals
        ]
        n_rows = account(ledger, intervals, job.idle)
    return n_samples, n_rows
