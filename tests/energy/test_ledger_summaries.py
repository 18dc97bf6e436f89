"""Conversation summaries (final_turn, ttfet_s, e2e_s) written with the turns (energy/ledger_turns.py): a
conversation a batch creates gets them folded from that batch, one that existed from all its turns in the
ledger; both ways give what refreshing every conversation with an OK final turn in the batch from the ledger
gives, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, select

from energy.db import ConversationRow
from energy.ledger import Ledger
from energy.records import TurnRecord, TurnStatus

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
_RUNS = itertools.count()


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    lg = Ledger(ledger_url, run_id="run-1", policy="conserve")
    lg.upgrade()
    yield lg
    lg.close()


def _turn(cid: str, k: int, n: int, at_s: float, *, final: bool, status: TurnStatus) -> TurnRecord:
    arrival = T0 + timedelta(seconds=at_s)
    return TurnRecord(
        conversation_id=cid,
        turn=k,
        request_id=f"{cid}-{k}-{n}",
        instance_id="d0",
        arrival_at=arrival,
        first_token_at=arrival + timedelta(seconds=0.25),
        last_token_at=arrival + timedelta(seconds=1.5),
        prompt_tokens=100,
        output_tokens=10,
        finish_reason="stop" if final else "tool_calls",
        is_final=final,
        status=status,
    )


def _summaries(lg: Ledger) -> dict[str, tuple[Any, ...]]:
    c = ConversationRow
    with lg._tx("reading") as conn:
        rows = conn.execute(select(c.id, c.final_turn, c.ttfet_s, c.e2e_s).where(c.run_id == lg.run_id))
        return {r.id: (r.final_turn, r.ttfet_s, r.e2e_s) for r in rows}


def test_a_batch_of_new_one_turn_conversations_takes_two_statements(ledger: Ledger) -> None:
    ledger.record_turns([_turn("warm", 1, 0, 0.0, final=True, status=TurnStatus.OK)])  # the run row
    statements: list[str] = []
    event.listen(ledger._engine, "before_cursor_execute", lambda _c, _cur, sql, *_: statements.append(sql))
    ledger.record_turns([_turn(f"c{i}", 1, 0, i, final=True, status=TurnStatus.OK) for i in range(3)])
    written = [s for s in statements if s.lstrip().upper().startswith(("INSERT", "UPDATE", "SELECT"))]
    assert len(written) == 2, written  # the conversations (with their summaries), then the turns
    assert _summaries(ledger)["c2"] == (1, 0.25, 1.5)


# a batch: (conversation, turn, arrival s, final, ok) per record; conversations span batches
_records = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.integers(1, 3),
        st.integers(0, 20),
        st.booleans(),
        st.booleans(),
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(_records, min_size=1, max_size=4))
def test_summaries_equal_a_full_refresh_from_the_ledger(
    ledger: Ledger, batches: list[list[tuple[str, int, int, bool, bool]]]
) -> None:
    ledger.run_id = f"run-{next(_RUNS)}"  # a fresh run per example
    ledger._run_known = False
    n = 0
    for batch in batches:
        recs = []
        for cid, k, at_s, final, ok in batch:
            n += 1
            status = TurnStatus.OK if ok else TurnStatus.ERROR
            recs.append(_turn(cid, k, n, at_s, final=final, status=status))
        ledger.record_turns(recs)
        stored = _summaries(ledger)
        # what recording did before summaries were folded: every conversation with an OK final turn in the
        # batch refreshed from all its turns in the ledger
        finals = {r.conversation_id for r in recs if r.is_final and r.status == TurnStatus.OK}
        with ledger._tx("refreshing") as conn:
            ledger._refresh_summaries(conn, sorted(finals))
        assert _summaries(ledger) == stored
