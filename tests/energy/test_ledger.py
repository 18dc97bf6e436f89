"""The SQL ledger on a real database (SQLite file and PostgreSQL): migrations, turns, pins, energy rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, inspect

from energy import db
from energy.errors import EnergyError
from energy.ledger import Ledger
from energy.records import (
    AttributionRow,
    ConversationSummary,
    EnergySample,
    ReportFilter,
    RunInfo,
    RunKind,
    Source,
    TurnRecord,
    TurnStatus,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def turn(
    cid: str,
    k: int,
    *,
    at_s: float,
    ttft_s: float = 0.5,
    dur_s: float = 2.0,
    final: bool = False,
    instance: str = "d0",
    **kw: object,
) -> TurnRecord:
    arrival = T0 + timedelta(seconds=at_s)
    return TurnRecord(
        conversation_id=cid,
        turn=k,
        request_id=f"{cid}-{k}-{kw.pop('attempt', 0)}",
        instance_id=instance,
        arrival_at=arrival,
        first_token_at=arrival + timedelta(seconds=ttft_s),
        last_token_at=arrival + timedelta(seconds=dur_s),
        prompt_tokens=1000 * k,
        output_tokens=100,
        finish_reason="stop" if final else "tool_calls",
        is_final=final,
        tier="a40",
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    lg = Ledger(ledger_url, policy="conserve")
    lg.upgrade()
    yield lg
    lg.close()


def test_migrations_upgrade_empty_database_to_head_and_match_models(ledger_url: str) -> None:
    lg = Ledger(ledger_url)
    assert lg.revision() is None
    lg.upgrade()
    assert lg.revision() == db.head_revision()
    lg.upgrade()  # idempotent
    engine = create_engine(ledger_url)
    insp = inspect(engine)
    tables = set(insp.get_table_names()) - {"alembic_version"}
    assert tables == set(db.Base.metadata.tables)
    for name, table in db.Base.metadata.tables.items():
        assert {c["name"] for c in insp.get_columns(name)} == set(table.columns.keys()), name
    engine.dispose()
    lg.close()


def test_recording_before_upgrade_says_how_to_fix(sqlite_url: str) -> None:
    lg = Ledger(sqlite_url)
    with pytest.raises(EnergyError, match=r"no schema.*Ledger.upgrade\(\)"):
        lg.record_turn(turn("c1", 1, at_s=0))


def test_turns_pins_and_ttfet_round_trip(ledger: Ledger) -> None:
    ledger.record_pin("c1", "d0", at=T0, reason="placed")
    ledger.record_turns(
        [turn("c1", 1, at_s=0, remote_prefill=True, prefill_instance_id="p0"), turn("c1", 2, at_s=3)]
    )
    view = ledger.get_conversation("c1")
    assert view is not None and not view.done and view.ttfet_s is None
    assert view.pinned_instance_id == "d0"
    ledger.record_turn(turn("c1", 3, at_s=6, ttft_s=0.25, final=True))
    view = ledger.get_conversation("c1")
    assert view is not None and view.done
    assert view.final_turn == 3
    assert view.ttfet_s == pytest.approx(6.25)
    assert view.e2e_s == pytest.approx(8.0)
    assert [t.turn for t in view.turns] == [1, 2, 3]
    assert view.turns[0].remote_prefill and view.turns[0].prefill_instance_id == "p0"
    assert view.turns[0].arrival_at == T0 and view.turns[0].arrival_at.tzinfo is not None
    assert view.policy == "conserve"
    assert ledger.get_conversation("nope") is None


def test_replacement_is_a_new_pin_row_and_nothing_is_lost(ledger: Ledger) -> None:
    ledger.record_pin("c1", "d0", at=T0)
    ledger.record_turn(turn("c1", 1, at_s=0))
    ledger.record_turn(turn("c1", 2, at_s=3, status=TurnStatus.ERROR))
    ledger.record_pin("c1", "d1", at=T0 + timedelta(seconds=4), reason="replaced: d0 down")
    ledger.record_turn(turn("c1", 2, at_s=4, instance="d1", final=True, attempt=1))
    view = ledger.get_conversation("c1")
    assert view is not None
    assert [p.instance_id for p in view.pins] == ["d0", "d1"]
    assert view.pinned_instance_id == "d1"
    assert [(t.turn, t.status) for t in view.turns] == [(1, "ok"), (2, "error"), (2, "ok")]
    assert ledger.current_pins() == {"c1": "d1"}


def test_duplicate_request_id_is_refused(ledger: Ledger) -> None:
    ledger.record_turn(turn("c1", 1, at_s=0))
    with pytest.raises(EnergyError, match="append-only"):
        ledger.record_turn(turn("c1", 1, at_s=0))


def test_naive_timestamps_are_refused_and_offsets_normalised(ledger: Ledger) -> None:
    with pytest.raises(EnergyError, match="arrival_at must be a timezone-aware"):
        ledger.record_turn(TurnRecord("c1", 1, "r1", "d0", arrival_at=datetime(2025, 1, 1)))
    plus2 = timezone(timedelta(hours=2))
    ledger.record_turn(TurnRecord("c2", 1, "r2", "d0", arrival_at=datetime(2025, 1, 1, 14, tzinfo=plus2)))
    view = ledger.get_conversation("c2")
    assert view is not None and view.turns[0].arrival_at == datetime(2025, 1, 1, 12, tzinfo=UTC)


def test_runs_separate_the_same_conversation_id(ledger_url: str) -> None:
    a = Ledger(ledger_url, run_id="sim-a", policy="conserve", kind=RunKind.SIMULATE)
    a.upgrade()
    b = Ledger(ledger_url, run_id="sim-b", policy="per-turn", kind=RunKind.SIMULATE)
    a.record_turn(turn("c1", 1, at_s=0, final=True))
    b.record_turn(turn("c1", 1, at_s=0, final=True))
    b.record_conversations([ConversationSummary("c1", ttfet_slowdown=2.5)])
    facts = {(f.run_id, f.conversation_id): f for f in a.conversation_facts()}
    assert set(facts) == {("sim-a", "c1"), ("sim-b", "c1")}
    assert facts[("sim-b", "c1")].policy == "per-turn" and facts[("sim-b", "c1")].ttfet_slowdown == 2.5
    assert facts[("sim-a", "c1")].ttfet_slowdown is None
    assert {r.run_id: r.policy for r in a.runs()} == {"sim-a": "conserve", "sim-b": "per-turn"}
    a.close()
    b.close()


def test_energy_rows_round_trip_and_filters(ledger: Ledger) -> None:
    ledger.start_run(RunInfo("live", RunKind.SERVE, "conserve", started_at=T0))
    samples = [
        EnergySample("m0", 0, T0 + timedelta(seconds=s), 100.0 * s, Source.MEASURED, "d0") for s in range(5)
    ]
    assert ledger.record_samples(samples) == 5
    rows = [
        AttributionRow(
            T0 + timedelta(seconds=s),
            T0 + timedelta(seconds=s + 1),
            "d0",
            cid,
            1,
            j,
            j / 100,
            Source.MEASURED,
            "a40",
        )
        for s in range(4)
        for cid, j in (("c1", 60.0), (None, 40.0))
    ]
    assert ledger.record_attributions(rows) == 8
    got = ledger.attributions(ReportFilter(since=T0 + timedelta(seconds=1), until=T0 + timedelta(seconds=3)))
    assert len(got) == 4
    assert sum(r.joules for _, r in got) == pytest.approx(200.0)
    assert all(run == "live" for run, _ in got)
    assert [s.cumulative_j for s in ledger.samples("m0")] == [0.0, 100.0, 200.0, 300.0, 400.0]
    with pytest.raises(EnergyError, match="non-negative"):
        ledger.record_attributions([AttributionRow(T0, T0, "d0", None, None, -1.0, 0.0, Source.MEASURED)])


def test_conversation_facts_sum_ok_turns_and_collect_tiers(ledger: Ledger) -> None:
    ledger.record_turns(
        [
            turn("c1", 1, at_s=0, instance="p0"),
            turn("c1", 2, at_s=2, status=TurnStatus.ERROR),
            turn("c1", 2, at_s=3, final=True, attempt=1),
        ]
    )
    (f,) = ledger.conversation_facts()
    assert f.turns == 2
    assert f.prompt_tokens == 3000 and f.output_tokens == 200 and f.tokens == 3200
    assert f.tiers == ("a40",)


def test_bad_urls_give_one_line_errors(tmp_path) -> None:
    with pytest.raises(EnergyError, match="not a valid SQLAlchemy URL"):
        Ledger("not a url")
    with pytest.raises(EnergyError, match="not supported"):
        Ledger("mysql://x@localhost/db")
    with pytest.raises(EnergyError, match="does not exist"):
        Ledger(f"sqlite:///{tmp_path}/missing/dir/ledger.db")


def test_turns_overlapping_uses_last_token_then_first_token_within_lookback(ledger: Ledger) -> None:
    t0 = datetime(2026, 1, 1, 12, tzinfo=UTC)
    s = timedelta(seconds=1)

    def mk(rid: str, arrival: datetime, first: datetime | None, last: datetime | None) -> TurnRecord:
        return TurnRecord(f"c-{rid}", 1, rid, "d0", arrival, first, last, 10, 2)

    ledger.record_turns(
        [
            mk("ended-before", t0 - 5 * s, t0 - 4 * s, t0 - 1 * s),  # ended before the interval
            mk("spans", t0 - 5 * s, t0 - 4 * s, t0 + 5 * s),  # runs through the interval
            mk("inside", t0 + 1 * s, t0 + 2 * s, t0 + 3 * s),
            mk("after", t0 + 20 * s, t0 + 21 * s, t0 + 22 * s),  # arrives after the interval
            mk("long", t0 - timedelta(hours=3), t0 - timedelta(hours=3), t0 + 1 * s),  # older than lookback
            mk("no-last", t0 + 1 * s, t0 + 2 * s, None),  # no last token: counted by its first token
            mk("no-last-old", t0 - timedelta(hours=2), t0 + 2 * s, None),  # no last token, beyond lookback
        ]
    )
    got = [r.request_id for r in ledger.turns_overlapping(t0, t0 + 10 * s)]
    assert got == ["long", "spans", "inside", "no-last"]


def test_records_survive_the_pipe_to_the_ledger_process() -> None:
    """ProcessLedgerWriter ships turns as turn_to_wire tuples of plain values and pins as PinRecords (pickled
    by value tuple): every field round-trips, and the wire tuple holds no object pickle would call back into
    Python for (datetimes, enums: what made the shipper thread hold the GIL)."""
    import pickle
    from dataclasses import fields

    from energy.records import PinRecord, TurnRecord, TurnStatus, turn_from_wire, turn_to_wire

    t0 = datetime(2025, 1, 1, 12, 0, 0, 999_999, tzinfo=UTC)
    values = {
        "conversation_id": "c", "turn": 3, "request_id": "r-3", "instance_id": "d1",
        "arrival_at": t0, "first_token_at": t0 + timedelta(seconds=1, microseconds=1),
        "last_token_at": None,
        "prompt_tokens": 11, "output_tokens": 7, "finish_reason": "tool_calls", "is_final": True,
        "status": TurnStatus.REPLACED, "prefill_instance_id": "p0", "remote_prefill": True, "tier": "a40",
        "cached_tokens": 5, "policy": "per-turn", "prefill_cached_tokens": 2, "tenant": "team-a",
    }  # fmt: skip
    assert set(values) == {f.name for f in fields(TurnRecord)}, "a new TurnRecord field: add it here"
    rec = TurnRecord(**values)  # type: ignore[arg-type]
    wire = turn_to_wire(rec)
    assert {type(v) for v in wire} <= {str, int, float, bool, type(None)}
    back = turn_from_wire(pickle.loads(pickle.dumps([wire], pickle.HIGHEST_PROTOCOL))[0])
    assert back == rec and type(back.status) is TurnStatus and back.arrival_at.tzinfo is UTC
    pin = PinRecord("c", "d1", t0, "replaced: d0 down")
    assert pickle.loads(pickle.dumps(pin)) == pin


@settings(max_examples=300, deadline=None)
@given(
    at=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2105, 12, 31), timezones=st.just(UTC)),
    other=st.sampled_from([timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]),
)
def test_wire_timestamps_keep_the_microsecond(at: datetime, other: timezone) -> None:
    """A POSIX float holds a 2000-2105 timestamp to < 0.5 us, so the wire format gives back the same
    microsecond, also for an aware non-UTC time; a naive time travels as it is, for the ledger to reject."""
    from energy.records import TurnRecord, turn_from_wire, turn_to_wire

    for value in (at, at.astimezone(other)):
        back = turn_from_wire(turn_to_wire(TurnRecord("c", 1, "r", "d", value, value, value)))
        assert back.arrival_at == value and back.last_token_at == value
        assert back.arrival_at.microsecond == at.microsecond and back.arrival_at.tzinfo is UTC
    naive = at.replace(tzinfo=None)
    assert turn_from_wire(turn_to_wire(TurnRecord("c", 1, "r", "d", naive))).arrival_at is naive


def test_turn_times_are_stored_in_one_format_so_range_queries_compare_them(tmp_path: Path) -> None:
    """Turn rows go through a driver-level executemany (energy/ledger.py _executemany); on SQLite their times
    must be stored exactly as SQLAlchemy stores them elsewhere ('YYYY-MM-DD HH:MM:SS.ffffff', also for whole
    seconds), or string comparisons in range queries (turns_overlapping) would miss rows."""
    import sqlite3

    from energy.records import TurnRecord

    path = tmp_path / "fmt.db"
    ledger = Ledger(f"sqlite:///{path}")
    ledger.upgrade()
    whole = datetime(2025, 1, 1, 0, 0, 5, tzinfo=UTC)
    ledger.record_turns([TurnRecord("c", 1, "r1", "d0", whole, whole, whole + timedelta(seconds=1))])
    with sqlite3.connect(path) as db:
        (arrival, last), = db.execute("SELECT arrival_at, last_token_at FROM turns").fetchall()
        (created,) = db.execute("SELECT created_at FROM conversations").fetchone()
    assert (arrival, last, created) == ("2025-01-01 00:00:05.000000", "2025-01-01 00:00:06.000000", arrival)
    found = ledger.turns_overlapping(whole + timedelta(seconds=1), whole + timedelta(seconds=2))
    assert [t.request_id for t in found] == ["r1"]


def test_a_sqlite_file_ledger_uses_the_write_ahead_log_and_full_sync(tmp_path: Path) -> None:
    """WAL: the server's readers and the writer process do not block each other, a commit is one fsync
    (bench_ledger.py, batches of 50: 80-82 vs 103-107 us CPU per conversation with the rollback journal);
    synchronous FULL: a committed row survives a power cut."""
    from sqlalchemy import text

    engine = db.make_engine(f"sqlite:///{tmp_path / 'wal.db'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    engine.dispose()


def test_power_caps_round_trip(ledger: Ledger) -> None:
    from energy.records import PowerCapRecord, ReportFilter

    recs = [
        PowerCapRecord("d0", "apply", "applied", T0, "a40", 200.0, 200.0, 300.0, 1, "GPU-b", ""),
        PowerCapRecord("d1", "apply", "no_permission", T0, "a40", 200.0, None, 300.0, 2, "GPU-c", "root"),
        PowerCapRecord("d0", "restore", "restored", T0 + timedelta(seconds=5), "a40", 300.0, 300.0),
    ]
    assert ledger.record_power_caps(recs) == 3
    got = ledger.power_caps()
    assert [r for _, r in got] == recs and {run for run, _ in got} == {"live"}
    assert len(ledger.power_caps(ReportFilter(since=T0 + timedelta(seconds=1)))) == 1
