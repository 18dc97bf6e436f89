"""Serving runtime: builds engines, router, ledger writer and scheduled jobs from fleet.yaml (+ plan).

``Runtime`` is what `orchestrator serve` runs behind the API (api/app.py starts and stops it in the app's
lifespan). It owns:

- the engines: simulated ones (orchestrator/engines/sim.py) from a plan's instances for ``backend: sim``,
  or ``VllmEngine`` clients for the fleet's ``engines:`` list for ``backend: vllm``;
- the :class:`orchestrator.router.Router` with the configured policy (placement/policies.make_policy);
- a ledger writer: turns and pins are queued by the router (no SQL on the event loop) and written in
  batches by a child process (:class:`ProcessLedgerWriter`, default) or a thread
  (:class:`BackgroundLedgerWriter`); ``stop()`` drains the queue, so no ledger row is lost on shutdown;
- APScheduler jobs (AsyncIOScheduler): poll engine health/metrics every ``poll_interval_s``, release pins of
  conversations idle for ``pin_ttl_s``.

Settings are pydantic-settings (env prefix ``CONSERVE_``), the edge where files and flags enter.
Must not import fastapi (the API imports this, not the reverse).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import inspect
import logging
import os
import pickle
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from conserve.errors import ConServeError
from energy.errors import EnergyError
from energy.records import (
    ConversationView,
    PinRecord,
    RunInfo,
    RunKind,
    TurnRecord,
    new_run_id,
    turn_from_wire,
    turn_to_wire,
)
from orchestrator.config import FleetConfig, load_fleet
from orchestrator.engines.base import Engine
from orchestrator.engines.sim import SimEngine, SimKvFabric, WallClock
from orchestrator.errors import ConfigError
from orchestrator.router import Router, RouterConfig
from placement.base import Role

log = logging.getLogger("conserve.runtime")

__all__ = [
    "ServeSettings",
    "Runtime",
    "BackgroundLedgerWriter",
    "ProcessLedgerWriter",
    "build_runtime",
    "default_sim_instances",
]


class ServeSettings(BaseSettings):
    """What `orchestrator serve` needs. Flags override the fleet file (db URL, policy)."""

    model_config = SettingsConfigDict(env_prefix="CONSERVE_", extra="forbid")

    fleet: Path = Field(Path("examples/fleet.yaml"), description="fleet.yaml to serve")
    plan: Path | None = Field(None, description="plan.yaml (orchestrator plan --out); sim backend")
    db: str | None = Field(
        None, description="SQLAlchemy URL of the ledger; default: the fleet's database_url"
    )
    policy: str | None = Field(None, description="placement policy; default: the fleet's policy")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    served_model_name: str | None = Field(None, description="model name clients send; default: fleet model")
    sim_speedup: float = Field(
        1.0, gt=0, description="simulated engines run this many times faster than modelled"
    )
    poll_interval_s: float = Field(1.0, gt=0, description="engine health/metrics poll period")
    pin_ttl_s: float = Field(900.0, gt=0, description="release the pin of a conversation idle this long")
    run_id: str | None = Field(
        None,
        min_length=1,
        description="ledger run the turns are recorded in; default: a new id per server start "
        "(energy.records.new_run_id), so a restart never merges conversations; replicas sharing a "
        "ledger set the same id",
    )
    ledger_writer: Literal["process", "thread"] = Field(
        "process",
        description="where ledger SQL runs: a child process (default; keeps it off the serving GIL) or a "
        "thread of this process (always used for in-memory SQLite, which another process cannot open)",
    )
    ledger_process_priority: Literal["idle", "nice"] = Field(
        "idle",
        description="CPU priority of the ledger writer process: 'idle' (SCHED_IDLE: runs only on a CPU "
        "nothing else wants; raised to nice 10 if it falls behind) or 'nice' (nice 10 throughout)",
    )
    ledger_batch_max: int = Field(500, ge=1)
    ledger_flush_interval_s: float = Field(
        0.25,
        gt=0,
        description="ship ledger records to the writer this often; larger batches cost less CPU per turn "
        "(SQLite, dev box: ~180 us/turn in batches of 40, ~60 us in batches of 500)",
    )
    energy_interval_s: float = Field(
        1.0,
        ge=0,
        description="energy accounting period (meters -> attribution "
        "-> ledger, energy/accounting.py); 0 disables it",
    )
    energy_lag_s: float = Field(
        10.0,
        ge=0,
        description="attribute an interval at least this long after it ends; an interval also waits "
        "for the turns still running in it (they are recorded when they end)",
    )
    power_state_file: Path | None = Field(
        None,
        description="state file of the GPU power limits serve changed (orchestrator/power.py); "
        "default ~/.cache/conserve/power-caps.json",
    )


# ---- the ledger writer --------------------------------------------------------------------------------


# Niceness of the ledger writer process: it only has to keep up on average (batches every
# ledger_flush_interval_s), never to answer fast.
LEDGER_PROCESS_NICE = 10
# With priority "idle" (SCHED_IDLE) the writer starves on a host whose CPUs are all busy: CI saw a flush wait
# 90 s for a writer that had not even finished starting. It is raised to SCHED_OTHER at nice 10 when this many
# batches (x batch_max records) are waiting in the server, ...
LEDGER_BACKLOG_BATCHES = 20
# ... or when a shipment or a flush/stop has gone unanswered this long. Unstarved, the writer answers in
# milliseconds (a batch of 500 turns is ~30 ms of SQL, benchmarks/bench_ledger.py).
LEDGER_STARVED_S = 2.0

# At shutdown, scheduled job runs in progress (an engine poll, an energy tick) get this long to end.
JOB_DRAIN_S = 10.0

_FLUSH = object()
_STOP = object()
# The writers' counters, as the writer process reports them to the server (ProcessLedgerWriter._request).
_WRITER_STATS = (
    "written_turns",
    "written_pins",
    "failed_batches",
    "last_error",
    "written_samples",
    "written_attributions",
    "failed_energy_jobs",
)


def _sort_record(rec: Any, turns: list[Any], pins: list[Any], jobs: list[Any]) -> None:
    """A record handed to a ledger writer, by kind: turn (a TurnRecord, or a tuple from turn_to_wire: how the
    process writer ships them), pin, or else an energy job (EnergyJob)."""
    if type(rec) is tuple:
        turns.append(turn_from_wire(rec))
    elif isinstance(rec, TurnRecord):
        turns.append(rec)
    elif isinstance(rec, PinRecord):
        pins.append(rec)
    else:
        jobs.append(rec)


class LedgerBatchWriter:
    """Writes batches of records to the ledger, pins before turns, synchronously.

    A failed batch is retried with back-off (up to 5 s between tries) and never dropped while serving; once
    ``_closed`` is set (shutdown) it gives up after the back-off reached 5 s, logging what it gave up. A batch
    rejected for a duplicate request_id is written one turn at a time so one bad row cannot block the rest.
    """

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger
        self.written_turns = 0
        self.written_pins = 0
        self.failed_batches = 0
        self.last_error: str | None = None
        self.written_samples = 0
        self.written_attributions = 0
        self.failed_energy_jobs = 0
        self._closed = False

    def _run_energy(self, jobs: Sequence[Any]) -> None:
        """Run the energy accountant's jobs (energy/accounting.py EnergyJob), after the records queued before
        them are written. A failed job is logged and counted, as a failed tick was in the serving process
        (its intervals are not retried: samples and rows are separate transactions, a retry could write the
        samples twice)."""
        if not jobs:
            return
        from energy.accounting import run_energy_job

        for job in jobs:
            try:
                n_samples, n_rows = run_energy_job(self.ledger, job)
            except Exception as err:  # noqa: BLE001 - SQL or conservation errors: logged, the writer goes on
                self.failed_energy_jobs += 1
                self.last_error = f"energy attribution failed: {type(err).__name__}: {err}"
                log.error("%s (%d intervals not attributed)", self.last_error, len(job.intervals))
                continue
            self.written_samples += n_samples
            self.written_attributions += n_rows

    def _write(self, pins: Sequence[PinRecord], turns: Sequence[TurnRecord]) -> bool:
        """Write the batch; False only when it gave up at shutdown."""
        delay_s = 0.05
        while True:
            try:
                if pins:
                    self.ledger.record_pins(list(pins))
                    self.written_pins += len(pins)
                    pins = []
                if turns:
                    self.ledger.record_turns(list(turns))
                    self.written_turns += len(turns)
                return True
            except EnergyError as err:
                self.failed_batches += 1
                self.last_error = str(err)
                if "already in run" in str(err) and len(turns) > 1:
                    # one duplicate request_id must not block the rest: write them one by one
                    for t in turns:
                        try:
                            self.ledger.record_turns([t])
                            self.written_turns += 1
                        except EnergyError as one:
                            log.error("ledger rejected turn %s: %s", t.request_id, one)
                    return True
                log.error("ledger write failed (retrying in %.2f s): %s", delay_s, err)
                if self._closed and delay_s >= 5.0:
                    log.error("giving up on %d pins and %d turns at shutdown", len(pins), len(turns))
                    return False
                time.sleep(delay_s)
                delay_s = min(5.0, delay_s * 2)


class BackgroundLedgerWriter(LedgerBatchWriter):
    """TurnSink that queues records and writes them from one thread in batches (pins before turns).

    A failed batch is retried (back-off up to 5 s) and never dropped; ``close()`` drains everything.
    """

    def __init__(self, ledger: Any, *, batch_max: int = 500, flush_interval_s: float = 0.05) -> None:
        super().__init__(ledger)
        self.batch_max = batch_max
        self.flush_interval_s = flush_interval_s
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="conserve-ledger-writer", daemon=True)
        self._thread.start()

    # TurnSink
    def turn(self, rec: TurnRecord) -> None:
        self._q.put(rec)

    def pin(self, rec: PinRecord) -> None:
        self._q.put(rec)

    def energy(self, job: Any) -> bool:
        """Queue an energy job (EnergyJob) to run after the records queued before it; False once closed."""
        if self._closed:
            return False
        self._q.put(job)
        return True

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Block until everything queued so far is written (for tests and shutdown)."""
        done = threading.Event()
        self._q.put((_FLUSH, done))
        return done.wait(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._q.put(_STOP)
        self._thread.join(timeout_s)

    @property
    def pending(self) -> int:
        return self._q.qsize()

    @staticmethod
    def _sort(it: Any, turns: list[Any], pins: list[Any], jobs: list[Any], events: list[Any]) -> None:
        if isinstance(it, tuple) and it and it[0] is _FLUSH:
            events.append(it[1])
        elif it is not _STOP:
            _sort_record(it, turns, pins, jobs)

    def _loop(self) -> None:
        stop = False
        while not stop:
            item = self._q.get()
            batch = [item]
            deadline = time.monotonic() + self.flush_interval_s
            while len(batch) < self.batch_max:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(self._q.get(timeout=remaining) if remaining > 0 else self._q.get_nowait())
                except queue.Empty:
                    break
            turns: list[TurnRecord] = []
            pins: list[PinRecord] = []
            jobs: list[Any] = []
            events: list[threading.Event] = []
            for it in batch:
                if it is _STOP:
                    stop = True
                else:
                    self._sort(it, turns, pins, jobs, events)
            if stop:  # drain what is left
                while True:
                    try:
                        it = self._q.get_nowait()
                    except queue.Empty:
                        break
                    self._sort(it, turns, pins, jobs, events)
            self._write(pins, turns)
            self._run_energy(jobs)
            for ev in events:
                ev.set()


class ProcessLedgerWriter:
    """TurnSink whose SQL runs in a child process, so ledger writes never hold the serving process's GIL.

    Why: a writer *thread* doing ~70-100 us of SQLAlchemy work per turn competes with the event loop for
    the GIL; an I/O-bound loop thread that gives the GIL up at every await waits up to the switch interval
    (5 ms) to get it back (the convoy effect), which showed as 7-100 ms TTFT p99 in benchmarks/
    bench_router.py. Here the serving process only appends records to a list; a shipper thread pickles the
    list every ``flush_interval_s`` (or at ``batch_max``) and sends it down a pipe to the child, which writes
    each shipment in one transaction with a :class:`LedgerBatchWriter` on its own connection to the same
    database (pins before turns, retries, duplicates one by one). If the child dies, later records go to an
    in-process BackgroundLedgerWriter instead; what the child had received but not yet committed when it
    died is lost (as the thread writer's queue would be if the server process died). ``flush()`` and
    ``close()`` wait for the child's acknowledgement, so a clean shutdown loses nothing.
    """

    def __init__(
        self,
        ledger: Any,
        *,
        batch_max: int = 500,
        flush_interval_s: float = 0.25,
        start_timeout_s: float = 60.0,
        priority: str = "idle",
    ) -> None:
        import multiprocessing

        if priority not in ("idle", "nice"):
            raise ValueError(f"ProcessLedgerWriter priority must be 'idle' or 'nice', got {priority!r}")
        self.ledger = ledger  # the parent's ledger: the fallback writer's
        self.batch_max = batch_max
        self.flush_interval_s = flush_interval_s
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and an event loop
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(
            target=_ledger_process_main,
            args=(
                child,
                ledger.url,
                ledger.run_id,
                ledger.policy,
                str(ledger.kind),
                batch_max,
            ),
            name="conserve-ledger-writer",
            daemon=True,
        )
        self._proc.start()
        child.close()
        # appended on the event loop, drained by the shipper: a deque (append/popleft are atomic), not a
        # list swapped out, which could lose a record appended to the old list after it was pickled
        self._buf: collections.deque[Any] = collections.deque()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._fallback: BackgroundLedgerWriter | None = None
        self._start_timeout_s = start_timeout_s
        self.written_turns = 0
        self.written_pins = 0
        self.failed_batches = 0
        self.written_samples = 0
        self.written_attributions = 0
        self.failed_energy_jobs = 0
        self.last_error: str | None = None
        self.priority = priority
        self._backlog_limit = LEDGER_BACKLOG_BATCHES * batch_max
        self._raised = priority != "idle"
        # The child starts at nice 10 and says "ready" once set up; only then does this process move it to
        # SCHED_IDLE (_read_acks), under this lock with raise_priority: a child that lowered itself could do
        # so after a raise (its start-up is slow on a busy host) and starve for good, as CI saw.
        self._prio_lock = threading.Lock()
        self._ready = False
        # shipments the child has not acknowledged yet: (records shipped so far, monotonic time shipped)
        self._unacked: collections.deque[tuple[int, float]] = collections.deque()
        self._shipped = 0
        self._shipper = threading.Thread(target=self._ship_loop, name="conserve-ledger-shipper", daemon=True)
        self._shipper.start()
        # A server that exits without close() must not hang in multiprocessing's exit handler, which joins
        # the child while the child waits for this end of the pipe to close: close it first (atexit runs
        # handlers last-registered first; multiprocessing registered its handler when it was imported).
        atexit.register(self._close_at_exit)

    # TurnSink: called on the event loop; a list append only
    def turn(self, rec: TurnRecord) -> None:
        buf = self._buf
        buf.append(turn_to_wire(rec))  # plain values: the shipper thread pickles them without Python calls
        n = len(buf)
        if n >= self.batch_max:
            self._wake.set()
            if n > self._backlog_limit and not self._raised:
                self.raise_priority()

    def raise_priority(self, why: str | None = None) -> bool:
        """The idle-priority writer fell behind (records pile up here, or it leaves shipments unanswered):
        give it a normal time share at nice 10, for the rest of the run. Needs the right to raise a priority
        (root, CAP_SYS_NICE or RLIMIT_NICE); without it the records wait until the writer catches up, and
        the log says what to set."""
        why = why or f"{len(self._buf)} records waiting"
        pid = self._proc.pid
        if pid is None:
            return False
        with self._prio_lock:
            self._raised = True
            was_idle = self._ready  # before "ready" the child was never idle: it runs at nice 10
            failed: OSError | None = None
            try:
                os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, pid, LEDGER_PROCESS_NICE)
            except OSError as err:
                failed = err
        if failed is not None:
            log.error(
                "ledger writer process fell behind (%s) and its idle CPU priority could not be raised (%s); "
                "records wait until it catches up. To avoid: CONSERVE_LEDGER_PROCESS_PRIORITY=nice",
                why,
                failed,
            )
            return False
        log.warning(
            "ledger writer process fell behind (%s): %s nice %d for the rest of the run",
            why,
            "raised from idle to" if was_idle else "kept at",
            LEDGER_PROCESS_NICE,
        )
        return True

    def _lower_priority(self) -> None:
        """The child is set up: move it to SCHED_IDLE (priority "idle"), unless it was raised meanwhile."""
        with self._prio_lock:
            self._ready = True
            if self._raised or self._proc.pid is None:
                return
            # SCHED_IDLE: only CPU time nothing else wants. At nice 10 the writer's bursts (a batch every
            # ledger_flush_interval_s) still took cores from the serving path on the 2-core dev box: added
            # TTFT p99 at 1 connection was lower with idle in paired runs (BENCHMARKS.md, router overhead).
            # Not before "ready": its start-up (~1 s of CPU) could starve at idle priority on a busy host.
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setscheduler(self._proc.pid, os.SCHED_IDLE, os.sched_param(0))

    def _read_acks(self) -> Any:
        """Take the child's acknowledgements (and its "ready") off the pipe (caller holds _send_lock); return
        the first other message (a flush/stop answer) or None."""
        conn = self._conn
        while conn.poll(0):
            msg = pickle.loads(conn.recv_bytes())
            if msg[0] == "ack":
                self._ack(msg[1])
            elif msg[0] == "ready":
                self._lower_priority()
            else:
                return msg
        return None

    def _ack(self, received: int) -> None:
        unacked = self._unacked
        while unacked and unacked[0][0] <= received:
            unacked.popleft()

    def _check_starved(self, now: float) -> None:
        if not self._raised and self._unacked and now - self._unacked[0][1] > LEDGER_STARVED_S:
            self.raise_priority(f"a shipment unanswered for {now - self._unacked[0][1]:.1f} s")

    def pin(self, rec: PinRecord) -> None:
        self._buf.append(rec)

    def energy(self, job: Any) -> bool:
        """Queue an energy job (EnergyJob: samples and intervals to attribute, energy/accounting.py) to run
        in the writer process after the records queued before it; False once closed (the caller runs it)."""
        if self._closed:
            return False
        self._buf.append(job)
        self._wake.set()
        return True

    @property
    def pending(self) -> int:
        return len(self._buf) + (self._fallback.pending if self._fallback is not None else 0)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _ship_loop(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self._ship()

    def _ship(self) -> None:
        with self._send_lock:
            buf = self._buf
            batch = [buf.popleft() for _ in range(len(buf))]  # only this thread pops
            if self._fallback is None and (batch or self._unacked or not self._ready):
                try:
                    unasked = self._read_acks()
                    if unasked is not None:  # cannot happen: answers are read by _request, which asked
                        log.error("ledger process sent %r unasked; ignored", unasked[0])
                    now = time.monotonic()
                    self._check_starved(now)
                    if not batch:
                        return
                    self._conn.send_bytes(pickle.dumps(batch, pickle.HIGHEST_PROTOCOL))
                    self._shipped += len(batch)
                    self._unacked.append((self._shipped, now))
                    return
                except (OSError, EOFError, ValueError) as err:
                    self._use_fallback(f"ledger process unreachable ({type(err).__name__}: {err})")
            if not batch:
                return
            assert self._fallback is not None
            for rec in batch:
                if type(rec) is tuple:
                    self._fallback.turn(turn_from_wire(rec))
                elif isinstance(rec, PinRecord):
                    self._fallback.pin(rec)
                else:
                    self._fallback.energy(rec)

    def _use_fallback(self, why: str) -> None:
        log.error("%s; writing the ledger from this process instead", why)
        self.last_error = why
        self._fallback = BackgroundLedgerWriter(
            self.ledger, batch_max=self.batch_max, flush_interval_s=self.flush_interval_s
        )

    def _request(self, what: str, timeout_s: float) -> bool:
        """Ship what is buffered, ask the child to `what` ("flush" or "stop"), wait for its answer."""
        self._ship()
        with self._send_lock:
            if self._fallback is not None:
                return self._fallback.flush(timeout_s) if what == "flush" else True
            try:
                self._conn.send_bytes(pickle.dumps((what, timeout_s)))
                asked = time.monotonic()
                deadline = asked + timeout_s + self._start_timeout_s
                while True:
                    answer = self._read_acks()
                    if answer is not None:
                        break
                    now = time.monotonic()
                    if now >= deadline:
                        return False
                    self._check_starved(now)
                    if not self._raised and now - asked > LEDGER_STARVED_S:
                        self.raise_priority(f"a {what} unanswered for {now - asked:.1f} s")
                    self._conn.poll(min(deadline - now, 0.1 if not self._raised else 1.0))
                _, ok, stats = answer
                self._unacked.clear()  # the child answers after writing everything shipped before the request
            except (OSError, EOFError, ValueError) as err:
                self._use_fallback(f"ledger process failed ({type(err).__name__}: {err})")
                return False
            for name, value in zip(_WRITER_STATS, stats, strict=True):
                if name != "last_error" or value:  # keep the server's own last error if the child has none
                    setattr(self, name, value)
            return bool(ok)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Block until everything queued so far is written (for tests, shutdown and energy accounting)."""
        if self._closed:  # close() wrote everything (or handed it to the fallback writer)
            return self._fallback.flush(timeout_s) if self._fallback is not None else True
        return self._request("flush", timeout_s)

    def _close_at_exit(self) -> None:
        if not self._closed:
            log.warning("ledger writer not closed before exit: closing it now (writes what it holds)")
            self.close()

    def close(self, timeout_s: float = 30.0) -> None:
        if self._closed:
            return
        atexit.unregister(self._close_at_exit)
        self._request("stop", timeout_s)
        self._closed = True
        self._wake.set()
        self._shipper.join(timeout_s)
        self._ship()  # anything recorded meanwhile (goes to the fallback: the child is gone)
        if self._fallback is not None:
            self._fallback.close(timeout_s)
        self._proc.join(timeout_s)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()


def _ledger_process_main(
    conn: Any, url: str, run_id: str, policy: str | None, kind: str, batch_max: int
) -> None:
    """The ledger writer process: batches of records in, SQL out (see ProcessLedgerWriter).

    It ignores SIGINT/SIGTERM (Ctrl-C or `timeout` signal the whole process group): it stops when the
    server says "stop" after its last records, or when the pipe closes because the server is gone."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # background work: the serving process gets the CPU first
        # absolute, not os.nice()'s increment: the server may have set nice 10 already (raise_priority)
        if os.getpriority(os.PRIO_PROCESS, 0) < LEDGER_PROCESS_NICE:
            os.setpriority(os.PRIO_PROCESS, 0, LEDGER_PROCESS_NICE)
    from energy.ledger import Ledger
    from energy.records import RunKind

    ledger = Ledger(url, run_id=run_id, policy=policy, kind=RunKind(kind))
    # Set up: the server moves this process to SCHED_IDLE (priority "idle") when it reads this, unless it
    # has raised it meanwhile (ProcessLedgerWriter._lower_priority). Never lower ourselves: that could undo
    # a raise.
    conn.send_bytes(pickle.dumps(("ready",)))
    # One thread: receive what the server shipped (everything already in the pipe, up to batch_max records),
    # write it in one transaction, answer a flush/stop after the records sent before it are written. The
    # per-transaction cost dominates at small batches: this process used 740-870 ms CPU for 3,000 turns
    # shipped every 50 ms and 325-400 ms shipped every 250 ms (1 connection, benchmarks/bench_router.py
    # stub setup, dev box), hence the 0.25 s default ledger_flush_interval_s.
    writer = LedgerBatchWriter(ledger)
    pins: list[PinRecord] = []
    turns: list[TurnRecord] = []
    jobs: list[Any] = []  # energy jobs: run after the records before them are written
    received = 0  # records received, acknowledged after each transaction (the server's starvation check)
    gone = False
    try:
        while not gone:
            control = None
            try:
                msg = pickle.loads(conn.recv_bytes())
                while True:
                    if not isinstance(msg, list):
                        control = msg
                        break
                    received += len(msg)
                    for rec in msg:
                        _sort_record(rec, turns, pins, jobs)
                    if len(turns) + len(pins) >= batch_max or not conn.poll(0):
                        break
                    msg = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the serving process is gone: write what we have, then exit
                gone = writer._closed = True
            if control is not None and control[0] == "stop":
                writer._closed = True
            ok = writer._write(pins, turns)
            writer._run_energy(jobs)
            pins, turns, jobs = [], [], []
            if control is None and not gone:
                try:
                    conn.send_bytes(pickle.dumps(("ack", received)))
                except OSError:  # the serving process is gone; what it shipped is written
                    gone = True
            if control is not None:
                what, _timeout_s = control
                stats = tuple(getattr(writer, name) for name in _WRITER_STATS)
                conn.send_bytes(pickle.dumps(("stopped" if what == "stop" else "flushed", ok, stats)))
                if what == "stop":
                    return
    finally:
        ledger.close()


class LedgerPinLookup:
    """Router PinLookup over the ledger (shared pins across replicas), off the event loop."""

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    async def lookup(self, conversation_id: str) -> ConversationView | None:
        return await asyncio.to_thread(self.ledger.get_conversation, conversation_id)


# ---- building the fleet -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimInstance:
    instance_id: str
    tier: str
    role: Role
    tier_model: Any


def default_sim_instances(cfg: FleetConfig) -> list[SimInstance]:
    """A fleet when there is neither a plan nor a planner: per tier, ~1/4 prefillers (>= 1) and the rest
    decoders when both roles are allowed, else all GPUs in the one allowed role. One GPU per instance."""
    from orchestrator.fleet import tier_model

    out: list[SimInstance] = []
    for t in cfg.tiers:
        if t.count <= 0:
            continue
        tm = tier_model(cfg, t.name)
        if "prefill" in t.roles and "decode" in t.roles and t.count >= 2:
            n_pre = max(1, t.count // 4)
            roles = [Role.PREFILL] * n_pre + [Role.DECODE] * (t.count - n_pre)
        else:
            roles = [Role(t.roles[0])] * t.count
        counters: dict[Role, int] = {}
        for r in roles:
            i = counters.get(r, 0)
            counters[r] = i + 1
            out.append(SimInstance(f"{t.name}-{r.value}-{i}", t.name, r, tm))
    return out


def _sim_instances(cfg: FleetConfig, plan_path: Path | None) -> tuple[list[Any], str]:
    from orchestrator import fleet

    if plan_path is not None:
        return list(fleet.instances_from_plan(cfg, fleet.load_plan(plan_path))), f"plan {plan_path}"
    try:
        from orchestrator import planner  # planning helper's module; optional until it lands
    except ImportError:
        planner = None  # type: ignore[assignment]
    make = getattr(planner, "make_plan", None) or getattr(planner, "plan_fleet", None) if planner else None
    if make is not None:
        try:
            made = make(cfg)
            plan = getattr(made, "plan", made)  # planner.make_plan returns a PlanRun wrapping the Plan
            return list(fleet.instances_from_plan(cfg, plan)), "planner (no --plan given)"
        except ConServeError as err:
            log.warning("planner could not plan this fleet (%s); using the default split", err)
    return list(default_sim_instances(cfg)), "default split (no plan)"


@dataclass
class Runtime:
    cfg: FleetConfig
    settings: ServeSettings
    router: Router
    engines: dict[str, Engine]
    served_model_name: str
    ledger: Any
    writer: BackgroundLedgerWriter | ProcessLedgerWriter
    fleet_source: str
    backend: str
    policy_name: str
    _scheduler: Any = None
    _started: bool = False
    _jobs: set[asyncio.Task[Any]] = field(default_factory=set)  # scheduled job runs in progress
    notes: list[str] = field(default_factory=list)
    accountant: Any = None  # energy.accounting.EnergyAccountant (None: energy accounting off)
    power: Any = None  # orchestrator.power.SessionPowerCaps: GPU caps applied at start, restored at stop

    async def start(self) -> None:
        """Start scheduled jobs (needs the running event loop) and take a first observation."""
        if self._started:
            return
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        if self.power is not None:  # caps before the first request (NVML calls block: off the loop)
            await asyncio.to_thread(self.power.start, self.ledger)
        await self.router.poll()
        if self.accountant is not None:
            # the engines' token counters now are the baseline of the model meters' activity: without it the
            # first tick took its own reading as the baseline and the work served before it got no energy
            await self.accountant.observe_engines()
        sched = AsyncIOScheduler()
        sched.add_job(
            self._job(self.router.poll),
            "interval",
            seconds=self.settings.poll_interval_s,
            id="poll-engines",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        sched.add_job(
            self._job(self.router.expire_idle),  # on the loop: it edits the router's conversations
            "interval",
            seconds=min(30.0, self.settings.pin_ttl_s),
            id="expire-pins",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        if self.accountant is not None:
            self.accountant.install(sched, self.settings.energy_interval_s, wrap=self._job)
        sched.start()
        self._scheduler = sched
        self._started = True

    def _job(self, fn: Any) -> Any:
        """A scheduled job as a coroutine on the event loop whose runs `stop()` can wait for: APScheduler's
        shutdown cancels runs in progress and logs each as "Error running job" with a traceback."""

        async def run() -> None:
            task = asyncio.current_task()
            assert task is not None
            self._jobs.add(task)
            try:
                result = fn()
                if inspect.isawaitable(result):
                    await result
            finally:
                self._jobs.discard(task)

        run.__qualname__ = getattr(fn, "__qualname__", "job")
        return run

    def scheduler_pause(self) -> None:
        """Pause the scheduled jobs (tests: make a failure invisible to the health poll)."""
        if self._scheduler is not None:
            self._scheduler.pause()

    def scheduler_resume(self) -> None:
        if self._scheduler is not None:
            self._scheduler.resume()

    async def stop(self) -> None:
        """Stop jobs, close engines, drain the ledger queue (no row lost), close the ledger."""
        if self._scheduler is not None:
            self._scheduler.pause()  # no new runs; let those in progress end (a poll, a tick: seconds)
            await asyncio.sleep(0)  # a run submitted just now starts and registers
            if self._jobs:
                await asyncio.wait(set(self._jobs), timeout=JOB_DRAIN_S)
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self.accountant is not None:
            await self.accountant.observe_engines()  # the engines' last token counts, before they close
            await asyncio.to_thread(self.accountant.wait_idle)  # a cancelled tick runs on in its thread
        await self.router.aclose()
        if self.accountant is not None:  # every turn is handed to the writer: attribute what is still pending
            await asyncio.to_thread(self.accountant.finish)  # a last job, queued behind those turns
        await asyncio.to_thread(self.writer.close)  # writes the turns, then runs the job
        if self.accountant is not None:
            self.accountant.close()
        if self.power is not None:  # the previous GPU power limits back (a crash: the next start does it)
            await asyncio.to_thread(self.power.stop, self.ledger)
        self.ledger.close()
        self._started = False


def build_runtime(
    settings: ServeSettings, cfg: FleetConfig | None = None, instances: Sequence[Any] | None = None
) -> Runtime:
    """Everything `orchestrator serve` runs, from settings (and an already-loaded fleet, for tests).

    `instances` (objects with instance_id, tier, role, tier_model) overrides the plan for the sim backend.
    """
    from energy.ledger import Ledger
    from placement.policies import make_policy

    cfg = cfg or load_fleet(settings.fleet)
    spec = cfg.model_spec()
    served = settings.served_model_name or spec.name
    policy_name = settings.policy or cfg.policy
    policy = make_policy(policy_name)
    engines: dict[str, Engine] = {}
    caps: dict[str, int] = {}
    if cfg.backend == "sim":
        if instances is not None:
            instances, source = list(instances), "explicit instances"
        else:
            instances, source = _sim_instances(cfg, settings.plan)
        if not instances:
            raise ConfigError(f"{settings.fleet}: the plan has no instances. To fix: give tiers a count > 0.")
        fabric = SimKvFabric()
        clock = WallClock(settings.sim_speedup)
        for inst in instances:
            engines[inst.instance_id] = SimEngine(
                inst.instance_id,
                inst.role,
                inst.tier,
                inst.tier_model,
                model_name=served,
                clock=clock,
                fabric=fabric,
            )
            caps[inst.instance_id] = inst.tier_model.kv_capacity_tokens
    else:
        try:
            from orchestrator.engines.vllm import VllmEngine
        except ImportError as err:  # pragma: no cover - shipped together
            raise ConfigError("backend 'vllm' needs orchestrator/engines/vllm.py") from err
        from orchestrator.fleet import tier_model

        for e in cfg.engines:
            engines[e.id] = VllmEngine(e.id, Role(e.role), e.tier, e.url)
            caps[e.id] = tier_model(cfg, e.tier).kv_capacity_tokens  # replaced by the engine's own report
        source = f"engines: in {settings.fleet}"
    # GPU power caps (fleet.yaml / plan), applied in start(); decided before anything is started, so a bad cap
    # fails here with one line
    from orchestrator.power import SessionPowerCaps

    plan = None
    if cfg.backend == "vllm" and settings.plan is not None:
        from orchestrator.fleet import load_plan

        plan = load_plan(settings.plan)
    power = SessionPowerCaps.for_fleet(cfg, plan, settings.power_state_file, instances or ())
    db_url = settings.db or cfg.database_url
    if settings.run_id is None:  # issue 14: one run per server start (energy/records.py new_run_id)
        settings = settings.model_copy(update={"run_id": new_run_id(RunKind.SERVE)})
    assert settings.run_id is not None
    ledger = Ledger(db_url, run_id=settings.run_id, policy=policy.name, kind=RunKind.SERVE)
    ledger.upgrade()
    ledger.start_run(RunInfo(settings.run_id, RunKind.SERVE, policy.name, label=str(settings.fleet)))
    writer: BackgroundLedgerWriter | ProcessLedgerWriter
    in_memory = db_url.startswith("sqlite") and (
        db_url.endswith(":memory:") or db_url.rstrip("/") == "sqlite:"
    )
    if settings.ledger_writer == "process" and not in_memory:
        writer = ProcessLedgerWriter(
            ledger,
            batch_max=settings.ledger_batch_max,
            flush_interval_s=settings.ledger_flush_interval_s,
            priority=settings.ledger_process_priority,
        )
    else:
        writer = BackgroundLedgerWriter(
            ledger, batch_max=settings.ledger_batch_max, flush_interval_s=settings.ledger_flush_interval_s
        )
    router = Router(
        engines,
        policy,
        RouterConfig(
            model_name=served,
            max_context_tokens=spec.max_context_tokens,
            pin_ttl_s=settings.pin_ttl_s,
            run_id=settings.run_id,
        ),
        sink=writer,
        pin_lookup=LedgerPinLookup(ledger),
        kv_capacity_tokens=caps,
    )
    accountant = None
    if settings.energy_interval_s > 0:  # meters -> attribution -> ledger (energy/accounting.py)
        from energy.accounting import build_accountant
        from energy.lease import lease_for
        from orchestrator.fleet import tier_model as _tier_model

        metered = (
            instances
            if cfg.backend == "sim"
            else [SimInstance(e.id, e.tier, Role(e.role), _tier_model(cfg, e.tier)) for e in cfg.engines]
        )
        accountant = build_accountant(
            ledger,
            metered,
            engines=engines,
            cfg=cfg,
            lag_s=settings.energy_lag_s,
            horizon=router.settled_before,  # running turns are not recorded yet: wait for them
            # samples and attribution run in the ledger writer, after the turns handed to it before them
            offload=writer.energy,
            lease=lease_for(db_url, settings.run_id),  # one replica per run accounts (energy/lease.py)
        )
    return Runtime(
        cfg=cfg,
        settings=settings,
        router=router,
        engines=engines,
        served_model_name=served,
        ledger=ledger,
        writer=writer,
        fleet_source=source,
        backend=cfg.backend,
        policy_name=policy.name,
        accountant=accountant,
        power=power,
    )
