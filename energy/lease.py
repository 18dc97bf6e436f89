"""Which router replica does a run's energy accounting: an exclusive lease per (ledger, run).

Several `orchestrator serve` replicas may share one ledger and one set of engines. Every replica sees the
engines' token counters, so if each ran its own :class:`energy.accounting.EnergyAccountant`, every engine's
energy would be sampled and attributed once per replica (the ledger would hold it N times). The replica
holding the lease accounts; the others skip their accounting ticks and try to take the lease on each tick,
so when the holder stops or dies another replica takes over on its next tick.

- PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) on a connection kept open for the
  purpose; it is released when that connection ends, including when the process dies.
- SQLite file: ``flock`` on ``.conserve-locks/<database file>.energy-<run>.lock`` next to it (replicas
  sharing an SQLite file are on one host); released when the file is closed, including when the process dies.
- SQLite in memory: no other process can see the database: always held.

Must not import fastapi.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from energy.errors import EnergyError

log = logging.getLogger(__name__)


class Lease(Protocol):
    description: str
    # False: try_acquire/still_held are a few syscalls, fine on the event loop; True: they query a database
    # (the accountant then calls them in a worker thread)
    blocking: bool

    def try_acquire(self) -> bool:
        """Take the lease if it is free (non-blocking). True if this object holds it now."""
        ...

    def still_held(self) -> bool:
        """Whether the lease taken earlier is still ours (False after a lost database connection)."""
        ...

    def release(self) -> None: ...


class LocalLease:
    """A database no other process can see (SQLite in memory): always held."""

    description = "in-memory database (no other replica can share it)"
    blocking = False

    def try_acquire(self) -> bool:
        return True

    def still_held(self) -> bool:
        return True

    def release(self) -> None:
        return None


class FileLease:
    """``flock(LOCK_EX | LOCK_NB)`` on a lock file; held while the file stays open."""

    blocking = False  # open + flock(LOCK_NB) once, then an attribute check

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"lock file {path}"
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        import fcntl

        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise EnergyError(
                f"cannot open the energy accounting lock file {self.path}: {err}. To fix: make its directory "
                "writable, or turn energy accounting off (CONSERVE_ENERGY_INTERVAL_S=0)"
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by another replica
            os.close(fd)
            return False
        self._fd = fd
        return True

    def still_held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None


def advisory_key(run_id: str) -> int:
    """A stable signed 64-bit advisory-lock key for a run (PostgreSQL's bigint)."""
    digest = hashlib.blake2b(f"conserve-energy-accounting:{run_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PgAdvisoryLease:
    """``pg_try_advisory_lock(key)`` on a dedicated connection; held while that connection lives."""

    blocking = True  # each check is a round trip to the database

    def __init__(self, url: str, run_id: str) -> None:
        self.key = advisory_key(run_id)
        self.description = f"PostgreSQL advisory lock {self.key} (run {run_id!r})"
        self._engine = create_engine(url, poolclass=NullPool)
        self._conn: Connection | None = None

    def try_acquire(self) -> bool:
        if self._conn is not None:
            return self.still_held()
        try:
            conn = self._engine.connect()
        except SQLAlchemyError as err:
            log.warning("energy accounting lease: cannot connect to the ledger: %s", err)
            return False
        try:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
            conn.commit()
        except SQLAlchemyError as err:
            log.warning("energy accounting lease: %s", err)
            conn.close()
            return False
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    def still_held(self) -> bool:
        if self._conn is None:
            return False
        try:  # the lock lives as long as this session: a session that answers still holds it
            self._conn.execute(text("SELECT 1")).scalar()
            self._conn.commit()
            return True
        except SQLAlchemyError as err:
            log.error("energy accounting lease lost (ledger connection failed: %s)", err)
            self._drop()
            return False

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._conn.close()
            self._conn = None

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                self._conn.commit()
            except SQLAlchemyError:
                pass  # closing the session releases it anyway
            self._drop()
        self._engine.dispose()


LOCK_DIR = ".conserve-locks"


def lock_dir(db: Path) -> Path:
    """Where the lock files of an SQLite ledger live: a hidden directory beside the database (replicas
    sharing the file find it) that ignores itself in git (its own ``.gitignore`` of ``*``), so a ledger kept
    in a working tree leaves nothing untracked (issue 14: ``conserve.db.energy-live.lock`` was). The lock
    files stay after release: deleting a flock file another replica may have opened would let two lead."""
    d = db.parent / LOCK_DIR
    try:
        d.mkdir(exist_ok=True)
        ignore = d / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# lock files of the energy accounting lease (energy/lease.py)\n*\n")
    except OSError as err:
        raise EnergyError(
            f"cannot create the energy accounting lock directory {d}: {err}. To fix: make the ledger's "
            "directory writable, or turn energy accounting off (CONSERVE_ENERGY_INTERVAL_S=0)"
        ) from err
    return d


def lease_for(url: str, run_id: str) -> Lease:
    """The accounting lease of ``run_id`` in the ledger at ``url``."""
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        db = u.database or ""
        if db in ("", ":memory:") or db.startswith("file::memory:"):
            return LocalLease()
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:64]
        return FileLease(lock_dir(Path(db)) / f"{Path(db).name}.energy-{safe}.lock")
    if backend == "postgresql":
        return PgAdvisoryLease(url, run_id)
    raise EnergyError(
        f"energy accounting cannot share a run between replicas on a {backend!r} ledger; "
        "use SQLite or PostgreSQL (database_url)"
    )
