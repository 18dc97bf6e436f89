"""No ledger row lost when the writer must give a batch up (orchestrator/ledger_spool.py): the records go to a
spool file, and the next `serve` on the same database writes them into the ledger before it takes traffic.

Failures are real: a SQLite trigger that refuses every turn insert (a database error, retried with back-off,
given up at shutdown), and a PostgreSQL server cut off by a TCP proxy."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from energy.ledger import Ledger
from energy.records import PinRecord, RunKind
from orchestrator import ledger_worker
from orchestrator.config import parse_fleet
from orchestrator.fleet import tier_model
from orchestrator.ledger_spool import LedgerSpool, default_spool_path
from orchestrator.ledger_writer import LedgerWriter
from orchestrator.runtime import ServeSettings, SimInstance, build_runtime
from placement.base import Role
from tests.energy.test_run_ids import FLEET
from tests.orchestrator.test_ledger_writer import T0, _CuttableProxy, _turn

REFUSE = "CREATE TRIGGER refuse_turns BEFORE INSERT ON turns BEGIN SELECT RAISE(ABORT, 'disk says no'); END"


def _started(url: str, run_id: str) -> Ledger:
    """A serve run's ledger, migrated and its run started (as build_runtime leaves it)."""
    led = Ledger(url, run_id=run_id, policy="p", kind=RunKind.SERVE)
    led.upgrade()
    led.start_run()
    return led


def _sqlite(tmp_path: Path) -> tuple[str, Path]:
    db = tmp_path / "l.db"
    return f"sqlite:///{db}", db


def test_turns_given_up_at_shutdown_go_to_the_spool_and_replay_into_the_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_worker, "RETRY_MAX_S", 0.2)  # give up sooner at close (thread writer)
    url, db = _sqlite(tmp_path)
    led = _started(url, "live-a")
    with sqlite3.connect(db) as c:
        c.execute(REFUSE)
    spool = LedgerSpool(tmp_path / "spool.jsonl")
    w = LedgerWriter(led, process=False, flush_interval_s=0.01, spool=spool)
    for i in range(3):
        w.turn(_turn(i, f"c{i}"))
    w.pin(PinRecord("c0", "d0", T0, "placed"))
    time.sleep(0.3)  # retried while serving: nothing given up yet
    assert not spool.path.exists()
    w.close(timeout_s=30)
    assert w.written_turns == 0 and w.written_pins == 1  # the pins went first; the turns were refused
    assert w.spooled == 3
    lines = [json.loads(x) for x in spool.path.read_text().splitlines()]
    assert [x["turn"][2] for x in lines] == ["r0", "r1", "r2"] and {x["run_id"] for x in lines} == {"live-a"}

    with sqlite3.connect(db) as c:
        c.execute("DROP TRIGGER refuse_turns")
    rep = spool.replay(url)
    assert (rep.turns, rep.pins, rep.duplicates, rep.runs) == (3, 0, 0, ("live-a",))
    assert not spool.path.exists()
    with Ledger(url) as lg:
        assert sorted((r, t.request_id) for r, t in lg.turns()) == [("live-a", f"r{i}") for i in range(3)]
    assert spool.replay(url).turns == 0  # nothing left: a second replay is a no-op
    led.close()


def test_a_replay_skips_turns_already_written_and_a_line_cut_by_a_crash(tmp_path: Path) -> None:
    url, _ = _sqlite(tmp_path)
    led = _started(url, "live-b")
    led.record_turns([_turn(0, "c0")])
    spool = LedgerSpool(tmp_path / "spool.jsonl")
    from energy.records import turn_to_wire

    spool.append(("live-b", "p", "serve"), [turn_to_wire(_turn(0, "c0")), turn_to_wire(_turn(1, "c1"))])
    with open(spool.path, "a") as f:
        f.write('{"run_id": "live-b", "turn": [1, 2')  # the crash cut the last line
    rep = spool.replay(url)
    assert (rep.turns, rep.duplicates) == (1, 1)
    assert sorted(t.request_id for _, t in led.turns()) == ["r0", "r1"]
    led.close()


def test_a_replay_the_database_refuses_keeps_the_file(tmp_path: Path) -> None:
    url, db = _sqlite(tmp_path)
    led = _started(url, "live-c")
    from energy.records import turn_to_wire

    spool = LedgerSpool(tmp_path / "spool.jsonl")
    spool.append(("live-c", "p", "serve"), [turn_to_wire(_turn(0, "c0"))])
    before = spool.path.read_text()
    with sqlite3.connect(db) as c:
        c.execute(REFUSE)
    with pytest.raises(Exception, match="disk says no"):
        spool.replay(url)
    assert spool.path.read_text() == before
    led.close()


def test_default_spool_is_beside_a_sqlite_file_and_per_database_otherwise(tmp_path: Path) -> None:
    assert default_spool_path(f"sqlite:///{tmp_path / 'x.db'}") == tmp_path / "x.db.spool.jsonl"
    a = default_spool_path("postgresql://u:secret@h:5432/a")
    b = default_spool_path("postgresql://u:secret@h:5432/b")
    assert a != b and a.parent == b.parent and "secret" not in a.name


def _serve(db_url: str, db: Path | None = None, refuse: bool = False) -> str:
    cfg = parse_fleet(dict(FLEET, database_url=db_url))
    tm = tier_model(cfg, "a40")
    insts = [SimInstance("p0", "a40", Role.PREFILL, tm), SimInstance("d0", "a40", Role.DECODE, tm)]
    settings = ServeSettings(
        fleet=Path("inline"), db=db_url, sim_speedup=50.0, energy_interval_s=0, ledger_writer="thread",
        ledger_durable=False,  # the answer must not wait for a turn the database refuses
    )  # fmt: skip
    rt = build_runtime(settings, cfg, instances=insts)
    if refuse:
        assert db is not None
        with sqlite3.connect(db) as c:
            c.execute(REFUSE)
    with TestClient(create_app(settings, runtime=rt)) as client:
        r = client.post(
            "/v1/chat/completions",
            headers={"X-Conversation-Id": "agent-1"},
            json={
                "model": "Qwen3-0.6B",
                "messages": [{"role": "user", "content": "go " * 50}],
                "max_tokens": 4,
            },
        )
        assert r.status_code == 200, r.text
    return rt.settings.run_id or ""


def test_serve_replays_what_the_previous_server_gave_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server whose ledger refused its turn until it stopped: the turn is in the spool beside the SQLite
    file, and the next server on that ledger writes it (under the first server's run id) before serving."""
    monkeypatch.setattr(ledger_worker, "RETRY_MAX_S", 0.2)
    url, db = _sqlite(tmp_path)
    run1 = _serve(url, db, refuse=True)
    spool = default_spool_path(url)
    assert spool.exists(), "the given-up turn was not kept"
    with Ledger(url) as lg:
        assert lg.turns() == []
    with sqlite3.connect(db) as c:
        c.execute("DROP TRIGGER refuse_turns")
    run2 = _serve(url)
    assert not spool.exists()
    with Ledger(url) as lg:
        turns = lg.turns()
    assert sorted(run for run, _ in turns) == sorted([run1, run2])  # the replayed turn keeps its own run
    assert [t.conversation_id for _, t in turns] == ["agent-1", "agent-1"]


@pytest.mark.postgres
def test_close_during_a_postgresql_outage_spools_and_the_next_start_writes_it(
    pg_url: str, tmp_path: Path
) -> None:
    """The process writer, PostgreSQL cut off while the server stops: the worker gives the batch up once its
    back-off is at the cap (tests/orchestrator/test_ledger_writer.py), and the turn is kept in the spool;
    with the database back, the replay writes it exactly once."""
    from sqlalchemy.engine import make_url

    real = make_url(pg_url)
    proxy = _CuttableProxy(int(real.port or 5432))
    led = Ledger(real.set(port=proxy.port).render_as_string(hide_password=False), run_id="live-pg")
    led.upgrade()
    led.start_run()
    spool = LedgerSpool(tmp_path / "spool.jsonl")
    w = LedgerWriter(led, batch_max=500, flush_interval_s=0.01, spool=spool)
    try:
        assert w.wait_ready(60) and w.flush(60)
        proxy.cut()
        w.turn(_turn(0, "c0"))
        time.sleep(0.5)
        w.close(timeout_s=60)
        assert w.written_turns == 0 and w.spooled == 1
    finally:
        led.close()
        proxy.close()
    rep = spool.replay(pg_url)
    assert rep.turns == 1 and not spool.path.exists()
    with Ledger(pg_url, run_id="live-pg") as lg:
        assert [t.request_id for _, t in lg.turns()] == ["r0"]
