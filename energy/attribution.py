"""Attribution: split each engine's energy in an interval among the conversation turns it served then.

The rule (DESIGN.md section 8), for one engine and one interval with energy E (metered or modelled):
  1. the idle part I = min(E, the engine's idle baseline for the interval) goes to an explicit idle row
     (conversation NULL) -- or, with ``IdlePolicy.SHARE``, is shared like the rest;
  2. the remainder E - I is split among the (conversation, turn) pairs that did work on the engine in the
     interval, in proportion to their modelled work
         w = prefill_tokens * e_prefill + decode_tokens * e_decode
     where e_prefill / e_decode are the tier model's energy per token of each phase (``PhaseWeights``);
  3. an interval with no work gives everything to the idle row.
Invariants (tests/energy/test_attribution.py, hypothesis): the rows of an interval sum to E within 1e-9
relative; no row is negative; a conversation with no work on that engine in that interval gets no row.

Pure: no clock, no I/O. Must not import fastapi or sqlalchemy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from energy.errors import EnergyError
from energy.records import AttributionRow, Source


class IdlePolicy(StrEnum):
    ROW = "row"  # idle baseline to an explicit idle row per engine (default)
    SHARE = "share"  # idle baseline shared across the interval's conversations by work


@dataclass(frozen=True, slots=True)
class PhaseWeights:
    """Modelled energy per token of each phase on one tier (J/token); only their ratio matters."""

    prefill_j_per_token: float
    decode_j_per_token: float

    def __post_init__(self) -> None:
        for name in ("prefill_j_per_token", "decode_j_per_token"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise EnergyError(f"PhaseWeights.{name} must be a positive finite number, got {v}")


# Representative operating point for the weights: a 2,048-token prefill chunk (vLLM's default
# max_num_batched_tokens for chunked prefill) and a decode batch of 32 sequences of 4k context each.
REF_PREFILL_TOKENS = 2048
REF_DECODE_BATCH = 32
REF_DECODE_CONTEXT_TOKENS = 32 * 4096


def phase_weights(
    tier: object,
    prefill_tokens: int = REF_PREFILL_TOKENS,
    decode_batch: int = REF_DECODE_BATCH,
    decode_context_tokens: int = REF_DECODE_CONTEXT_TOKENS,
) -> PhaseWeights:
    """Per-phase energy per token from a tiers.perf.TierModel: phase power x phase time / tokens."""
    t = tier
    prefill_j = t.prefill_power_w(prefill_tokens) * t.prefill_time_s(prefill_tokens) / prefill_tokens  # type: ignore[attr-defined]
    step_s = t.decode_step_time_s(decode_batch, decode_context_tokens)  # type: ignore[attr-defined]
    decode_j = t.decode_power_w(decode_batch, decode_context_tokens) * step_s / decode_batch  # type: ignore[attr-defined]
    return PhaseWeights(prefill_j, decode_j)


@dataclass(frozen=True, slots=True)
class Work:
    """Tokens one conversation turn had processed on one engine within one interval (fractions allowed)."""

    conversation_id: str
    turn: int
    prefill_tokens: float = 0.0
    decode_tokens: float = 0.0

    def weight(self, w: PhaseWeights) -> float:
        return self.prefill_tokens * w.prefill_j_per_token + self.decode_tokens * w.decode_j_per_token


@dataclass(frozen=True, slots=True)
class EngineInterval:
    """One engine's energy over [start, end) and the work it did then."""

    engine_id: str
    start: datetime
    end: datetime
    energy_j: float
    idle_j: float  # the idle baseline inside energy_j (callers: min(E, idle_w * duration))
    work: tuple[Work, ...]
    source: Source
    tier: str | None = None
    weights: PhaseWeights | None = None  # None: prefill and decode tokens weigh the same

    def __post_init__(self) -> None:
        if not (math.isfinite(self.energy_j) and self.energy_j >= 0):
            raise EnergyError(
                f"engine {self.engine_id!r}: interval energy must be finite and >= 0 J, got "
                f"{self.energy_j}. A decreasing meter means a counter reset the meter missed"
            )
        if not (math.isfinite(self.idle_j) and self.idle_j >= 0):
            raise EnergyError(f"engine {self.engine_id!r}: idle energy must be >= 0 J, got {self.idle_j}")
        if self.end < self.start:
            raise EnergyError(f"engine {self.engine_id!r}: interval ends ({self.end}) before it starts")
        for w in self.work:
            if w.prefill_tokens < 0 or w.decode_tokens < 0:
                raise EnergyError(
                    f"engine {self.engine_id!r}: negative tokens for {w.conversation_id} turn {w.turn}"
                )


def attribute(iv: EngineInterval, idle: IdlePolicy = IdlePolicy.ROW) -> list[AttributionRow]:
    """Rows for one engine-interval; they sum to ``iv.energy_j`` (see the module docstring)."""
    weights = iv.weights or PhaseWeights(1.0, 1.0)
    merged: dict[tuple[str, int], float] = {}
    pre_w: dict[tuple[str, int], float] = {}  # the prefill part of each weight (phase split of the rows)
    for w in iv.work:
        x = w.weight(weights)
        if x > 0:
            key = (w.conversation_id, w.turn)
            merged[key] = merged.get(key, 0.0) + x
            pre_w[key] = pre_w.get(key, 0.0) + w.prefill_tokens * weights.prefill_j_per_token
    total_e = iv.energy_j
    idle_j = min(iv.idle_j, total_e)
    if not merged:
        idle_j = total_e
    elif idle == IdlePolicy.SHARE:
        idle_j = 0.0
    to_share = total_e - idle_j
    total_w = math.fsum(merged.values())

    def row(cid: str | None, turn: int | None, joules: float) -> AttributionRow:
        share = joules / total_e if total_e > 0 else (1.0 if cid is None else 0.0)
        pre = None
        if cid is not None and turn is not None:
            x = merged[(cid, turn)]
            pre = min(joules, joules * pre_w[(cid, turn)] / x)
        return AttributionRow(
            iv.start, iv.end, iv.engine_id, cid, turn, joules, share, iv.source, iv.tier, pre
        )

    parts = [(cid, turn, to_share * x / total_w) for (cid, turn), x in sorted(merged.items())]
    # Make the rows sum to E exactly in floating point: put the residual on the largest row (it is ~1 ulp,
    # far smaller than that row, so it cannot turn it negative).
    if parts:
        residual = to_share - math.fsum(p[2] for p in parts)
        k = max(range(len(parts)), key=lambda i: parts[i][2])
        cid, turn, j = parts[k]
        parts[k] = (cid, turn, max(j + residual, 0.0))
    rows = [row(cid, turn, j) for cid, turn, j in parts]
    if idle_j > 0 or not rows:
        rows.append(row(None, None, idle_j))
    return rows


def attribute_all(
    intervals: Iterable[EngineInterval], idle: IdlePolicy = IdlePolicy.ROW
) -> list[AttributionRow]:
    out: list[AttributionRow] = []
    for iv in intervals:
        out.extend(attribute(iv, idle))
    return out


def check_conservation(
    intervals: Sequence[EngineInterval], rows: Sequence[AttributionRow], rel_tol: float = 1e-9
) -> None:
    """Raise EnergyError when the rows of some engine-interval do not sum to its energy."""
    sums: dict[tuple[str, datetime, datetime], list[float]] = {}
    for r in rows:
        sums.setdefault((r.engine_id, r.interval_start, r.interval_end), []).append(r.joules)
    metered: dict[tuple[str, datetime, datetime], list[float]] = {}
    for iv in intervals:  # an engine may report several intervals with the same bounds (zero-length ones)
        metered.setdefault((iv.engine_id, iv.start, iv.end), []).append(iv.energy_j)
    for key, energies in metered.items():
        want = math.fsum(energies)
        got = math.fsum(sums.get(key, []))
        if abs(got - want) > rel_tol * abs(want) or (want == 0 and got != 0):
            raise EnergyError(
                f"attribution of {key[0]} [{key[1]}, {key[2]}) sums to {got} J, metered {want} J"
            )
