"""The per-conversation summary: TTFET, E2E and the slowdowns, computed here and nowhere else.

DESIGN.md section 2: TTFET runs from the arrival of turn 1 to the first token of the *final* turn (live: the
latest successful turn that ended without tool calls or that the client marked final; simulated: the
workload's last turn); E2E to its last token. A slowdown is a metric over the same metric for the conversation
served alone on an idle reference instance (None when that is unknown or not positive).

The router updates a conversation's summary as each final turn ends (:func:`final_turn_times`); the simulator
and any reader of recorded turns fold a whole conversation (:func:`conversation_times`). The SQL ledger folds
its rows in the same way (energy/ledger.py ``_refresh_summaries``, on datetimes); tests/core/test_summary.py
checks it against :func:`conversation_times`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


def final_turn_times(
    first_arrival_s: float, first_token_s: float | None, last_token_s: float | None
) -> tuple[float | None, float | None]:
    """(TTFET, E2E) of a conversation whose final turn's first / last token came at these times."""
    ttfet = None if first_token_s is None else first_token_s - first_arrival_s
    e2e = None if last_token_s is None else last_token_s - first_arrival_s
    return ttfet, e2e


@dataclass(frozen=True, slots=True)
class TurnTimes:
    """One recorded turn, as the summary reads it (in recording order)."""

    turn: int
    arrival_s: float
    first_token_s: float | None
    last_token_s: float | None
    final: bool
    ok: bool = True


@dataclass(frozen=True, slots=True)
class ConversationTimes:
    first_arrival_s: float
    final_turn: int | None  # None: no final turn yet
    ttfet_s: float | None
    e2e_s: float | None


def conversation_times(turns: Iterable[TurnTimes]) -> ConversationTimes:
    """Fold a conversation's recorded turns: t0 = the earliest arrival; the final turn is the latest recorded
    successful final turn. Raises ValueError for a conversation with no turns."""
    first: float | None = None
    final: TurnTimes | None = None
    for t in turns:
        if first is None or t.arrival_s < first:
            first = t.arrival_s
        if t.final and t.ok:
            final = t
    if first is None:
        raise ValueError("a conversation summary needs at least one turn")
    if final is None:
        return ConversationTimes(first, None, None, None)
    ttfet, e2e = final_turn_times(first, final.first_token_s, final.last_token_s)
    return ConversationTimes(first, final.turn, ttfet, e2e)


def slowdowns(
    ttfet_s: float,
    e2e_s: float,
    tbt_mean_s: float,
    standalone_ttfet_s: float | None,
    standalone_e2e_s: float | None,
    standalone_tbt_mean_s: float | None,
) -> tuple[float | None, float | None, float | None]:
    """(TTFET, E2E, mean last-turn TBT) slowdowns against the standalone latencies."""

    def ratio(x: float, ref: float | None) -> float | None:
        return x / ref if ref is not None and ref > 0 else None

    return (
        ratio(ttfet_s, standalone_ttfet_s),
        ratio(e2e_s, standalone_e2e_s),
        ratio(tbt_mean_s, standalone_tbt_mean_s),
    )
