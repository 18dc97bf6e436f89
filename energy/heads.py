"""Conversation heads on PostgreSQL: the turn numbers and pins that router replicas sharing a ledger agree on.

Several `orchestrator serve` replicas on one PostgreSQL ledger may each receive turns of one conversation, in
any interleaving. Each used to number turns and pin from its own memory (issue 13 item 3: turns stored as
1,2,2,3,3 and conversations split over decoders). Here the database decides, one row per conversation in
``conversation_heads`` (migration 0006; energy/db.py ConversationHeadRow):

- :meth:`PgConversationHeads.claim` starts a turn: one ``INSERT .. ON CONFLICT DO UPDATE .. RETURNING``,
  atomic under PostgreSQL's row lock, gives out the next turn number (1 for a new conversation) and returns
  the pin in force (cleared when the conversation has been idle longer than the pin TTL), the context of the
  last finished turn and the first arrival. Two replicas claiming at once get consecutive numbers.
- :meth:`PgConversationHeads.move_pin` binds the conversation to a decoder by compare-and-set (``UPDATE ..
  WHERE pin IS NOT DISTINCT FROM expected``); a replica that lost the race gets the winner's pin and uses it,
  so a conversation is never on two decoders.
- :meth:`PgConversationHeads.finish` records a finished turn's context and decoder (and releases the pin
  when the client ended the conversation), unless a later turn was claimed meanwhile.

One round trip each, in autocommit, on a small pool of psycopg async connections (on the serving event
loop: no thread hop).

A replica that dies mid-turn: its turn's record may never be written (the client had no complete answer).
Every replica holds a session-level advisory lock (``REPLICA_LOCK_NAMESPACE``, its random key) on a
connection of its own while it serves; PostgreSQL drops it when the process dies. The head remembers which
replica claimed the last turn, in which run; a claim after another replica's reuses that turn's number when
that turn has no row in the ledger and its replica no longer holds its lock, so numbering goes on from what
was durable (issue 13 item 4). The pin stays: the next turn, on any replica, goes to the same decoder. The
extra checks run only when the previous turn was another replica's (an index probe of ``turns``) and, when
that turn has no row, a look at ``pg_locks``.

Errors (PostgreSQL down, a timeout) raise :class:`HeadsUnavailable`; the router then decides from
its memory as a single replica does (orchestrator/core/shared.py), so an outage never stops serving.

Must not import fastapi or the orchestrator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import make_url

from energy.errors import EnergyError
from energy.records import require_utc

log = logging.getLogger(__name__)

__all__ = ["HeadClaim", "HeadsUnavailable", "PgConversationHeads"]


class HeadsUnavailable(EnergyError):
    """The shared conversation heads could not be read or written (the router falls back to its memory)."""


@dataclass(frozen=True, slots=True)
class HeadClaim:
    """A claimed turn: its number and the conversation's shared state when it started."""

    turn: int
    pin: str | None
    context_tokens: int  # prompt + output of the last finished turn (0: none yet)
    last_decoder: str | None  # decoder of the last finished turn
    first_arrival_at: datetime


# The first key of every replica's advisory lock (the second is the replica's random key): "CnSv".
REPLICA_LOCK_NAMESPACE = 0x436E5376

_CLAIM = f"""
INSERT INTO conversation_heads AS h
    (conversation_id, turns, pin, context_tokens, last_decoder, first_arrival_at, active_at,
     run_id, claimed_by)
VALUES (%(cid)s, 1, NULL, 0, NULL, %(at)s, %(at)s, %(run)s, %(me)s)
ON CONFLICT (conversation_id) DO UPDATE SET
    turns = CASE
        WHEN h.claimed_by IS NULL OR h.run_id IS NULL OR h.claimed_by = EXCLUDED.claimed_by THEN h.turns + 1
        WHEN EXISTS (SELECT 1 FROM turns t WHERE t.run_id = h.run_id
                     AND t.conversation_id = h.conversation_id AND t.turn = h.turns) THEN h.turns + 1
        WHEN EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted
                     AND l.classid = {REPLICA_LOCK_NAMESPACE}::oid AND l.objid = h.claimed_by::oid
                     AND l.objsubid = 2) THEN h.turns + 1
        ELSE h.turns  -- its replica died before the turn was recorded: the number is given again
    END,
    run_id = EXCLUDED.run_id,
    claimed_by = EXCLUDED.claimed_by,
    pin = CASE WHEN h.active_at < %(stale)s THEN NULL ELSE h.pin END,
    first_arrival_at = LEAST(h.first_arrival_at, EXCLUDED.first_arrival_at),
    active_at = GREATEST(h.active_at, EXCLUDED.active_at)
RETURNING turns, pin, context_tokens, last_decoder, first_arrival_at
"""

_MOVE_PIN = """
UPDATE conversation_heads SET pin = %(new)s
WHERE conversation_id = %(cid)s AND pin IS NOT DISTINCT FROM %(expected)s
RETURNING pin
"""

_READ_PIN = "SELECT pin FROM conversation_heads WHERE conversation_id = %(cid)s"

_FINISH = """
UPDATE conversation_heads SET
    context_tokens = %(context)s,
    last_decoder = %(decoder)s,
    active_at = GREATEST(active_at, %(at)s),
    pin = CASE WHEN %(ended)s THEN NULL ELSE pin END
WHERE conversation_id = %(cid)s AND turns = %(turn)s
"""


def psycopg_conninfo(url: str) -> str:
    """A libpq URI for a ledger's SQLAlchemy URL (``postgresql+psycopg://...`` -> ``postgresql://...``)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise EnergyError(
            f"shared conversation state needs a PostgreSQL ledger, not {parsed.get_backend_name()!r}. "
            "To fix: use a postgresql+psycopg:// URL, or --shared-state memory for one replica."
        )
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


class PgConversationHeads:
    """Turn numbers and pins decided in PostgreSQL (see the module docstring). Use on one event loop."""

    def __init__(
        self,
        url: str,
        *,
        pin_ttl_s: float,
        run_id: str,
        max_connections: int = 8,  # statements at once; more wait (BENCHMARKS.md, 4 vs 8)
        timeout_s: float = 2.0,
    ) -> None:
        self._conninfo = psycopg_conninfo(url)
        self.run_id = run_id
        # this replica's advisory lock key (see the module docstring); 31 bits: pg_locks shows it as an oid
        self.replica_key = secrets.randbelow(2**31 - 1) + 1
        self._alive: Any = None  # the connection holding the replica's lock
        self._alive_lock: asyncio.Lock | None = None
        self.pin_ttl = timedelta(seconds=pin_ttl_s)
        self.timeout_s = timeout_s
        self._max = max_connections
        self._idle: list[Any] = []  # psycopg.AsyncConnection, ready for the next statement
        self._slots: asyncio.Semaphore | None = None  # made on the serving loop at first use
        self.description = f"conversation heads in {make_url(url).render_as_string(hide_password=True)}"

    # ---- connections ------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        import psycopg

        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max)
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            if conn is None:
                # synchronous_commit off: a claim does not wait for its WAL flush (an fsync per turn on the
                # serving path). Safe: the turn's record, committed synchronously by the ledger writer before
                # its answer's last byte, flushes the WAL up to it; a claim a database crash loses belongs
                # to a turn nobody had an answer for, and its number is given again.
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, prepare_threshold=0, options="-c synchronous_commit=off"
                )
            healthy = False
            try:
                yield conn
                healthy = True
            finally:
                if healthy and not conn.closed:
                    self._idle.append(conn)
                else:  # an error or a cancellation mid-statement: the connection's state is unknown
                    with contextlib.suppress(Exception):
                        await conn.close()

    async def _hold_replica_lock(self) -> None:
        """Take this replica's advisory lock (again, after a lost connection) before its first claim."""
        import psycopg

        def held() -> bool:
            return self._alive is not None and not self._alive.closed and not self._alive.broken

        if held():
            return
        if self._alive_lock is None:
            self._alive_lock = asyncio.Lock()
        async with self._alive_lock:  # the first claims arrive together: one connection takes the lock
            if held():
                return
            conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            await conn.execute("SELECT pg_advisory_lock(%s, %s)", (REPLICA_LOCK_NAMESPACE, self.replica_key))
            self._alive = conn

    async def _one(
        self, doing: str, sql: str, params: dict[str, Any], *, alive: bool = False
    ) -> tuple[Any, ...] | None:
        """One statement's first row (None: no row); `alive`: hold this replica's lock first."""
        import psycopg

        async def run() -> tuple[Any, ...] | None:
            if alive:
                await self._hold_replica_lock()
            async with self._conn() as conn:
                cur = await conn.execute(sql, params, prepare=True)
                return await cur.fetchone() if cur.description is not None else None

        try:
            return await asyncio.wait_for(run(), self.timeout_s)
        except (psycopg.Error, OSError, TimeoutError) as err:
            raise HeadsUnavailable(
                f"{self.description}: {doing} failed: {type(err).__name__}: {str(err).strip()[:200]}"
            ) from err

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        if self._alive is not None:
            idle.append(self._alive)
            self._alive = None
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.close()

    # ---- the three decisions ----------------------------------------------------------------------------
    async def claim(self, conversation_id: str, at: datetime) -> HeadClaim:
        """The next turn of `conversation_id`, arriving `at`: its number and the shared state."""
        at = require_utc(at, "claim at")
        row = await self._one(
            "claiming a turn",
            _CLAIM,
            {
                "cid": conversation_id,
                "at": at,
                "stale": at - self.pin_ttl,
                "run": self.run_id,
                "me": self.replica_key,
            },
            alive=True,
        )
        assert row is not None  # INSERT .. ON CONFLICT DO UPDATE .. RETURNING always returns the row
        turn, pin, context, last_decoder, first_at = row
        return HeadClaim(int(turn), pin, int(context), last_decoder, first_at)

    async def move_pin(self, conversation_id: str, expected: str | None, new: str) -> str | None:
        """Pin `conversation_id` to `new` if its pin is still `expected`; returns the pin in force after."""
        params = {"cid": conversation_id, "expected": expected, "new": new}
        row = await self._one("moving a pin", _MOVE_PIN, params)
        if row is not None:
            return str(row[0])
        row = await self._one("reading a pin", _READ_PIN, params)
        return None if row is None else row[0]

    async def finish(
        self,
        conversation_id: str,
        turn: int,
        *,
        context_tokens: int,
        decoder: str | None,
        ended: bool,
        at: datetime,
    ) -> None:
        """Turn `turn` ended well: its context and decoder for the next turn (wherever it arrives); `ended`
        (the client's final turn) releases the pin. No-op when a later turn was claimed meanwhile."""
        params = {
            "cid": conversation_id,
            "turn": turn,
            "context": context_tokens,
            "decoder": decoder,
            "ended": ended,
            "at": require_utc(at, "finish at"),
        }
        await self._one("finishing a turn", _FINISH, params)
