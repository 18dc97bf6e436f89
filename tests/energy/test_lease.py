"""One accountant per run across router replicas: the lease (energy/lease.py) on SQLite and PostgreSQL, and
two accountants sharing a ledger and engines that never count an engine's energy twice."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from energy.accounting import EnergyAccountant, EngineMeterBinding, LedgerTurnSource
from energy.errors import EnergyError
from energy.lease import FileLease, LocalLease, PgAdvisoryLease, advisory_key, lease_for
from energy.ledger import Ledger
from energy.meters import ReplayMeter
from energy.records import EnergySample

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def test_lease_kind_follows_the_ledger_url(tmp_path: Path) -> None:
    assert isinstance(lease_for("sqlite://", "live"), LocalLease)
    assert isinstance(lease_for("sqlite:///:memory:", "live"), LocalLease)
    f = lease_for(f"sqlite:///{tmp_path / 'l.db'}", "live/a b")
    assert isinstance(f, FileLease) and f.path == tmp_path / ".conserve-locks" / "l.db.energy-live_a_b.lock"
    with pytest.raises(EnergyError, match="use SQLite or PostgreSQL"):
        lease_for("mysql://u@h/db", "live")
    assert advisory_key("live") == advisory_key("live") != advisory_key("other")
    assert -(2**63) <= advisory_key("live") < 2**63


def test_file_lease_is_exclusive_and_freed_on_release(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    a, b = lease_for(url, "live"), lease_for(url, "live")
    other_run = lease_for(url, "sim-1")
    try:
        assert a.try_acquire() and a.try_acquire()  # re-entrant for its holder
        assert not b.try_acquire() and not b.still_held()
        assert other_run.try_acquire()  # runs are independent
        a.release()
        assert not a.still_held()
        assert b.try_acquire() and b.still_held()
    finally:
        for lease in (a, b, other_run):
            lease.release()


@pytest.mark.postgres
def test_pg_lease_is_exclusive_and_a_dead_session_frees_it(pg_url: str) -> None:
    a, b = PgAdvisoryLease(pg_url, "live"), PgAdvisoryLease(pg_url, "live")
    try:
        assert a.try_acquire() and a.still_held()
        assert not b.try_acquire()
        # the holder's session dies (process killed, connection cut): the lock goes with it
        admin = create_engine(pg_url)
        with admin.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()"
                )
            ).all()
        admin.dispose()
        assert killed == [(True,)]
        assert not a.still_held()  # notices the lost session instead of accounting on
        assert b.try_acquire() and b.still_held()
        assert not a.try_acquire()
    finally:
        a.release()
        b.release()


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> datetime:
        return self.t


def _accountant(ledger_url: str, clock: Clock, recorded: list[EnergySample]) -> EnergyAccountant:
    ledger = Ledger(ledger_url, policy="conserve")
    meter = ReplayMeter(recorded, clock=clock, meter_id="node")
    return EnergyAccountant(
        ledger,
        {"node": meter},
        [EngineMeterBinding("d0", "node", (0,), "a40", 0.0)],
        LedgerTurnSource(ledger),
        lag_s=0.0,
        clock=clock,
        lease=lease_for(ledger_url, "live"),
    )


async def test_two_replicas_account_an_engine_once_and_the_second_takes_over(ledger_url: str) -> None:
    """Replicas A and B meter the same engine (a recorded 300 W counter). Only the lease holder samples and
    attributes; when A stops, B takes over from a fresh baseline. The ledger holds each second at most
    once: no interval overlaps another, and the joules are those of the seconds accounted, not twice."""
    Ledger(ledger_url).upgrade()
    clock = Clock()
    recorded = [EnergySample("node", 0, T0 + timedelta(seconds=s), 300.0 * s) for s in range(0, 61)]
    a = _accountant(ledger_url, clock, recorded)
    b = _accountant(ledger_url, clock, recorded)
    assert a.leading and not b.leading  # A started first and holds the lease
    for s in range(1, 11):
        clock.t = T0 + timedelta(seconds=s)
        await a.tick()
        await b.tick()
    assert a.samples_written == 11 and b.samples_written == 0 and b.rows_written == 0
    await a.flush(observe=False)
    a.close()  # A stops (releases the lease)
    clock.t = T0 + timedelta(seconds=12)
    await b.tick()  # takes over: a fresh baseline at 12 s, nothing written yet
    assert b.leading and b.rows_written == 0
    for s in range(13, 21):
        clock.t = T0 + timedelta(seconds=s)
        await b.tick()
    await b.flush(observe=False)
    b.close()
    rows = sorted((r for _, r in Ledger(ledger_url).attributions()), key=lambda r: r.interval_start)
    spans = [(r.interval_start, r.interval_end) for r in rows]
    overlaps = [(p, n) for p, n in zip(spans, spans[1:], strict=False) if p[1] > n[0]]
    assert not overlaps
    assert spans[0] == (T0, T0 + timedelta(seconds=1)) and spans[-1][1] == T0 + timedelta(seconds=20)
    assert (T0 + timedelta(seconds=10), T0 + timedelta(seconds=12)) not in spans  # the hand-over gap
    # 0-10 s by A, 12-20 s by B: 18 s of 300 W, each once (twice would be 36 s' worth)
    assert math.fsum(r.joules for r in rows) == pytest.approx(300.0 * 18, rel=1e-9)


def test_the_lock_file_leaves_a_git_working_tree_clean(tmp_path: Path) -> None:
    """issue 14: a ledger in the working tree left `conserve.db.energy-live.lock` untracked (the repo's
    .gitignore has *.db, not the lock)."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("*.db\n")
    subprocess.run(["git", "-C", str(tmp_path), "add", ".gitignore"], check=True)
    lease = lease_for(f"sqlite:///{tmp_path / 'conserve.db'}", "live-x")
    assert lease.try_acquire()
    try:
        status = subprocess.run(
            ["git", "-C", str(tmp_path), "status", "--porcelain", "--untracked-files=all"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert status.strip() == "A  .gitignore", status
    finally:
        lease.release()
