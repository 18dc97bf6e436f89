"""The per-conversation summary (TTFET, E2E, slowdowns) computed once; the ledger's fold agrees with it."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from energy.ledger import Ledger
from energy.records import TurnRecord, TurnStatus
from orchestrator.core import TurnTimes, conversation_times, final_turn_times, slowdowns


def test_ttfet_runs_from_turn_1_to_the_first_token_of_the_latest_final_turn() -> None:
    turns = [
        TurnTimes(1, 10.0, 11.0, 12.0, final=False),
        TurnTimes(2, 12.5, 13.0, 14.0, final=True),  # a 'stop' turn; the chat went on
        TurnTimes(3, 15.0, 15.5, 16.0, final=True, ok=False),  # failed: not a final answer
        TurnTimes(3, 16.0, 17.0, 18.0, final=True),
    ]
    got = conversation_times(turns)
    assert (got.first_arrival_s, got.final_turn, got.ttfet_s, got.e2e_s) == (10.0, 3, 7.0, 8.0)
    assert conversation_times(turns[:1]).final_turn is None
    assert final_turn_times(10.0, None, None) == (None, None)
    with pytest.raises(ValueError):
        conversation_times([])


def test_slowdowns_are_ratios_to_the_standalone_latencies_or_none() -> None:
    assert slowdowns(10.0, 20.0, 0.05, 2.0, 4.0, 0.01) == pytest.approx((5.0, 5.0, 5.0))
    assert slowdowns(10.0, 20.0, 0.05, None, 0.0, 0.01)[:2] == (None, None)


T0 = datetime(2026, 1, 1, tzinfo=UTC)
_TURN = st.tuples(
    st.integers(0, 10_000),  # arrival (ms after T0)
    st.integers(0, 5_000),  # ttft (ms)
    st.integers(0, 5_000),  # first -> last token (ms)
    st.booleans(),  # final
    st.booleans(),  # ok
)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    path: Path = tmp_path_factory.mktemp("summary") / "ledger.db"
    lg = Ledger(f"sqlite:///{path}", policy="conserve")
    lg.upgrade()
    yield lg
    lg.close()


_ids = itertools.count()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_TURN, min_size=1, max_size=6))
def test_the_ledgers_summary_equals_the_cores(ledger: Ledger, turns: list[tuple]) -> None:
    """energy/ledger.py folds a conversation's turns on datetimes in its own code (one SELECT per chunk of
    conversations); whatever the turns, it must give the core's final turn, TTFET and E2E."""
    cid = f"c{next(_ids)}"
    recs, times = [], []
    for k, (arr, ttft, dur, final, ok) in enumerate(turns, start=1):
        a = T0 + timedelta(milliseconds=arr)
        f, last = a + timedelta(milliseconds=ttft), a + timedelta(milliseconds=ttft + dur)
        status = TurnStatus.OK if ok else TurnStatus.REPLACED
        recs.append(TurnRecord(cid, k, f"{cid}-{k}", "d0", a, f, last, 10, 2, is_final=final, status=status))
        times.append(TurnTimes(k, arr / 1e3, (arr + ttft) / 1e3, (arr + ttft + dur) / 1e3, final, ok))
    ledger.record_turns(recs)
    view = ledger.get_conversation(cid)
    core = conversation_times(times)
    assert view is not None
    assert view.final_turn == core.final_turn
    if core.ttfet_s is None:
        assert view.ttfet_s is None and view.e2e_s is None
    else:
        assert view.ttfet_s == pytest.approx(core.ttfet_s, abs=1e-9)
        assert view.e2e_s == pytest.approx(core.e2e_s, abs=1e-9)
