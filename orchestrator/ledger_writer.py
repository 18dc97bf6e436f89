"""The ledger writer of `serve`: turns, pins and energy jobs written off the event loop, in group commits.

The router hands records to a :class:`LedgerWriter` (its ``TurnSink``): ``turn()`` and ``pin()`` only append
to a deque. One committer thread takes everything queued (up to ``batch_max`` records) as one batch and runs
it in a one-worker ``concurrent.futures`` executor: a ``ProcessPoolExecutor`` (default) or, for an in-memory
SQLite ledger that another process cannot open, a ``ThreadPoolExecutor``. The worker writes the batch with a
:class:`LedgerBatchWriter` (orchestrator/ledger_worker.py; pins, then turns, in one transaction each). Records
queued while a batch commits form the next batch: a group commit, one transaction however many turns wait. The
energy accountant's jobs (energy/accounting.py EnergyJob) go, once the records queued before them are written,
to a second one-worker pool at nice ``LEDGER_PROCESS_NICE``, so no answer waits behind an attribution.

Durability. ``await wait_durable()`` returns once everything queued before the call is committed. The
router awaits it after recording a successful turn and before the turn's last byte (``[DONE]``, or the JSON
body) leaves, so a client never holds an answer the ledger could lose (issue 13 item 4).

Why a process: a writer *thread* doing ~70-100 us of SQLAlchemy work per turn competes with the event loop
for the GIL; an I/O-bound loop thread that gives the GIL up at every await waits up to the switch interval
(5 ms) to get it back (the convoy effect), which showed as 7-100 ms TTFT p99 in benchmarks/bench_router.py.
The records' worker runs at the niceness given (``serve``: 0 when answers wait for it, else
``LEDGER_PROCESS_NICE``).

Failures:

- SQL errors (PostgreSQL down): the worker retries the batch with back-off (up to 5 s between tries) and
  never drops it while serving; answers waiting for it wait. After ``close()`` it gives up once the back-off
  reached 5 s: what it gives up goes to the spool (orchestrator/ledger_spool.py, a JSON-lines file fsynced
  before the writer moves on), which the next ``serve`` on the database replays. A batch failing with an
  error that is not a database error (a bug) goes to the spool too, and its answers are released. Turns
  whose request_id is already in the ledger (:class:`energy.errors.DuplicateTurnError`) are skipped, the
  rest of the batch is written.
- The worker process dies (killed, out of memory): the pool breaks (``BrokenProcessPool``; the executor reaps
  the dead process). The committer starts a new pool and submits the batch again; turns the dead worker had
  committed are skipped as duplicates (a pin of that batch may be stored twice; the latest pin is the same).
  An energy job in flight is not repeated (its samples could be written twice): it is counted as failed.
  After ``MAX_RESTARTS_IN_ROW`` deaths without a batch written, the writer uses a thread of this process.

Must not import fastapi.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any

from energy.records import PinRecord, TurnRecord, turn_to_wire
from orchestrator.ledger_spool import LedgerSpool

# the worker's side (re-exported: tests and benchmarks import it from here)
from orchestrator.ledger_worker import (
    BatchResult,
    LedgerBatchWriter,
    _worker_init,
    _worker_write,
)

log = logging.getLogger("conserve.ledger_writer")

__all__ = ["LedgerWriter", "LedgerBatchWriter", "BatchResult", "LEDGER_PROCESS_NICE"]

# Niceness of the writer process: background work, the serving process gets a CPU first. Not SCHED_IDLE (the
# writer's class until issue 13): with answers waiting for their commit, a writer that runs only on an idle
# CPU holds every answer for as long as the host is busy (CI saw a SCHED_IDLE writer wait 90 s).
LEDGER_PROCESS_NICE = 10
# A dead worker is replaced this many times in a row (no batch written in between), then the writer runs
# in a thread of the serving process (the GIL cost above, but nothing is lost).
MAX_RESTARTS_IN_ROW = 3
# With nothing to write, the committer checks the worker is alive this often, so a killed worker is
# replaced before the next turn needs it (starting one takes ~1 s of imports).
HEALTH_CHECK_S = 1.0
_STOP = object()


# ---- the serving process's side ------------------------------------------------------------------------


class LedgerWriter:
    """TurnSink of `serve`: records queued on the event loop, written in group commits by an executor."""

    def __init__(
        self,
        ledger: Any,
        *,
        process: bool = True,
        batch_max: int = 500,
        flush_interval_s: float = 0.25,
        nice: int = LEDGER_PROCESS_NICE,
        spool: LedgerSpool | None = None,
    ) -> None:
        self.ledger = ledger  # the serving process's ledger (the thread executor's)
        # given-up records land here (None: logged only, e.g. an in-memory ledger nobody can replay into)
        self.spool = spool
        self.spooled = 0  # records written to the spool instead of the ledger
        self.batch_max = batch_max
        self.flush_interval_s = flush_interval_s
        self.written_turns = 0
        self.written_pins = 0
        self.failed_batches = 0
        self.written_samples = 0
        self.written_attributions = 0
        self.failed_energy_jobs = 0
        self.restarts = 0  # dead workers replaced
        self.batches = 0  # batches of turns and pins written (one transaction each, retries aside)
        self.last_error: str | None = None
        self.pid: int | None = None  # the worker process (None: not started yet, or a thread)
        self._buf: deque[Any] = deque()  # appended anywhere, popped by the committer only
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._closed = False
        self._in_flight = 0
        self._process = process
        self._nice = nice  # of the worker writing turns and pins (energy jobs: LEDGER_PROCESS_NICE)
        self._local: LedgerBatchWriter | None = None  # the thread executor's writer
        self._executor, self._write_fn = self._new_executor(nice)
        # Energy jobs run in a second worker process (in order, one at a time), so an answer never waits
        # behind an attribution; with a thread executor they queue on that one thread.
        self._jobs_executor: Executor | None = None
        self._jobs_broken = False
        self._jobs_in_flight: set[Future[BatchResult]] = set()
        self._stats_lock = threading.Lock()
        self._thread = threading.Thread(target=self._commit_loop, name="conserve-ledger-writer", daemon=True)
        self._thread.start()
        # A server that exits without close(): write what is queued before concurrent.futures shuts its
        # executors down at interpreter exit (its hook runs in threading's exit hooks, last registered first).
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(self._close_at_exit)
        else:  # pragma: no cover - CPython has had it since 3.9
            import atexit

            atexit.register(self._close_at_exit)

    def _new_executor(self, nice: int) -> tuple[Executor, Callable[[Sequence[Any]], BatchResult]]:
        if not self._process:
            self._local = LedgerBatchWriter(self.ledger)
            if self._closed:
                self._local.closing.set()
            return ThreadPoolExecutor(1, thread_name_prefix="conserve-ledger-sql"), self._local.write_batch
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and an event loop
        led = self.ledger
        pool: Executor = ProcessPoolExecutor(
            1,
            mp_context=ctx,
            initializer=_worker_init,
            initargs=(led.url, led.run_id, led.policy, str(led.kind), os.getpid(), self._closed, nice),
        )
        return pool, _worker_write

    # ---- TurnSink (event loop; appends only) ------------------------------------------------------------
    def turn(self, rec: TurnRecord) -> None:
        self._buf.append(turn_to_wire(rec))  # plain values: cheap to pickle
        if len(self._buf) >= self.batch_max:
            self._wake.set()

    def pin(self, rec: PinRecord) -> None:
        self._buf.append(rec)

    async def wait_durable(self) -> None:
        """Return once every record queued before this call is committed (or given up at shutdown)."""
        if not self._thread.is_alive():  # closed: everything it took was written or given up
            return
        fut = asyncio.get_running_loop().create_future()
        self._buf.append(fut)
        self._wake.set()
        await fut

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Block until the worker is up (the server is ready only then: the first answers need it)."""
        return self._ready.wait(timeout_s)

    def energy(self, job: Any) -> bool:
        """Queue an energy job (energy/accounting.py EnergyJob) to run after the records queued before it;
        False once closed (the caller runs it)."""
        if self._closed:
            return False
        self._buf.append(job)
        self._wake.set()
        return True

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Block until everything queued so far is written (tests, shutdown)."""
        if not self._thread.is_alive():
            return not self._buf
        done = threading.Event()
        self._buf.append(done)
        self._wake.set()
        return done.wait(timeout_s)

    @property
    def pending(self) -> int:
        """Records queued or being written (approximate while the committer takes a batch)."""
        try:
            waiting = sum(1 for x in self._buf if isinstance(x, (asyncio.Future, threading.Event)))
        except RuntimeError:  # the deque changed under the count (another thread appended or popped)
            waiting = 0
        return max(0, len(self._buf) - waiting) + self._in_flight

    def close(self, timeout_s: float = 30.0) -> None:
        """Write everything queued, then stop the worker."""
        if self._closed:
            return
        self._closed = True
        # a batch failing now (or later) gives up once its back-off is at the cap
        if self._local is not None:
            self._local.closing.set()
        elif self.pid is not None and _parent_of(self.pid) == os.getpid():  # still our worker
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGUSR1)
        self._buf.append(_STOP)
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("ledger writer did not finish within %.0f s; %d records not written", timeout_s,
                      self.pending)  # fmt: skip

    def _close_at_exit(self) -> None:
        if not self._closed:
            log.warning("ledger writer not closed before exit: closing it now (writes what it holds)")
            self.close()

    # ---- the committer thread ---------------------------------------------------------------------------
    def _commit_loop(self) -> None:
        self._call(None)  # start the worker now, not on the first turn
        self._ready.set()
        idle_since = time.monotonic()
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            if not self._buf:
                if time.monotonic() - idle_since >= HEALTH_CHECK_S:
                    self._call(None)  # a dead worker is replaced now
                    idle_since = time.monotonic()
                continue
            stop = False
            while self._buf and not stop:
                batch: list[Any] = []
                waiters: list[Any] = []
                while self._buf and len(batch) < self.batch_max:
                    it = self._buf.popleft()
                    if it is _STOP:
                        stop = True
                    elif isinstance(it, (asyncio.Future, threading.Event)):
                        waiters.append(it)
                    else:
                        batch.append(it)
                self._in_flight = len(batch)
                try:
                    self._write(batch, waiters)
                except Exception as err:  # noqa: BLE001 - a bug here must not leave answers waiting forever
                    self.failed_batches += 1
                    self.last_error = f"ledger writer failed: {type(err).__name__}: {err}"
                    log.exception("%s; %d records not written to the ledger", self.last_error, len(batch))
                    self._to_spool(batch)
                    _release(waiters)
                self._in_flight = 0
            idle_since = time.monotonic()
            if stop:
                self._wait_jobs()
                _release([w for w in self._buf if isinstance(w, (asyncio.Future, threading.Event))])
                self._executor.shutdown(wait=True)
                if self._jobs_executor is not None:
                    self._jobs_executor.shutdown(wait=True)
                return

    def _write(self, batch: list[Any], waiters: list[Any]) -> None:
        """Turns and pins; then wake the answers waiting for them and hand the energy jobs on (they need the
        turns before them written); flush() callers also wait for the jobs."""
        records = [r for r in batch if type(r) is tuple or isinstance(r, PinRecord)]
        jobs = [r for r in batch if not (type(r) is tuple or isinstance(r, PinRecord))]
        if records:
            self._call(records)
            self.batches += 1
        _release([w for w in waiters if not isinstance(w, threading.Event)])
        if jobs:
            self._submit_jobs(jobs)
        flushes = [w for w in waiters if isinstance(w, threading.Event)]
        if flushes:
            self._wait_jobs()
            _release(flushes)

    def _submit_jobs(self, jobs: list[Any]) -> None:
        if not self._process:  # one SQL thread: the jobs queue behind the records on it
            pool, fn = self._executor, self._write_fn
        else:
            if self._jobs_executor is None or self._jobs_broken:
                if self._jobs_executor is not None:
                    with contextlib.suppress(Exception):
                        self._jobs_executor.shutdown(wait=True)  # reaps a dead worker
                self._jobs_executor, fn = self._new_executor(LEDGER_PROCESS_NICE)
                self._jobs_broken = False
            pool, fn = self._jobs_executor, _worker_write
        try:
            fut = pool.submit(fn, jobs)
        except (BrokenExecutor, RuntimeError) as err:
            self._job_failed(len(jobs), err)
            self._jobs_broken = True
            return
        with self._stats_lock:
            self._jobs_in_flight.add(fut)
        n_jobs = len(jobs)
        fut.add_done_callback(lambda f: self._job_done(f, n_jobs))

    def _job_done(self, fut: Future[BatchResult], n: int) -> None:
        """Runs in the executor's thread when a job batch ends."""
        err = fut.exception() if not fut.cancelled() else RuntimeError("cancelled")
        if err is None:
            self._add(fut.result())
        else:
            self._jobs_broken = self._jobs_broken or isinstance(err, BrokenExecutor)
            self._job_failed(n, err)
        with self._stats_lock:
            self._jobs_in_flight.discard(fut)

    def _job_failed(self, n: int, err: BaseException) -> None:
        with self._stats_lock:
            self.failed_energy_jobs += n
            self.last_error = f"energy jobs failed: {type(err).__name__}: {err}"
        log.error("%s (%d jobs not run; their intervals are not attributed)", self.last_error, n)

    def _wait_jobs(self) -> None:
        with self._stats_lock:
            pending = list(self._jobs_in_flight)
        if pending:
            futures_wait(pending)

    def _call(self, records: list[Any] | None) -> None:
        """Run one batch (None: start or check the worker) in the executor; replace a worker that died."""
        deaths = 0
        while True:
            try:
                if records is None:
                    pid = self._executor.submit(os.getpid).result()
                    self.pid = pid if self._process else None
                    return
                res = self._executor.submit(self._write_fn, records).result()
                if self._process:
                    self.pid = res.pid
                self._add(res)
                return
            except BrokenExecutor as err:
                deaths += 1
                self._replace(f"ledger process died ({type(err).__name__}: {err})", deaths)
            except Exception as err:  # noqa: BLE001 - a bug in a batch must not stop the writer
                self.failed_batches += 1
                self.last_error = f"ledger batch failed: {type(err).__name__}: {err}"
                log.exception("%s; %d records not written to the ledger", self.last_error, len(records or ()))
                self._to_spool(records or [])
                return

    def _replace(self, why: str, deaths: int) -> None:
        self.last_error = why
        self.restarts += 1
        self.pid = None  # until the new worker reports
        old = self._executor
        with contextlib.suppress(Exception):
            old.shutdown(wait=True)  # the dead process is reaped, not left a zombie
        if deaths >= MAX_RESTARTS_IN_ROW and self._process:
            log.error("%s, %d times in a row; writing the ledger from this process instead", why, deaths)
            self._process = False
            self.pid = None
        else:
            log.error("%s; starting a new one", why)
            time.sleep(min(1.0, 0.1 * deaths))
        self._executor, self._write_fn = self._new_executor(self._nice)

    def _add(self, res: BatchResult) -> None:
        with self._stats_lock:
            self.written_turns += res.turns
            self.written_pins += res.pins
            self.failed_batches += res.failed_batches
            self.written_samples += res.samples
            self.written_attributions += res.attributions
            self.failed_energy_jobs += res.failed_energy_jobs
            if res.last_error:
                self.last_error = res.last_error
        if res.given_up:
            self._to_spool(res.given_up)

    def _to_spool(self, records: Sequence[Any]) -> None:
        """Keep given-up records on disk (the module docstring's failures); never raises."""
        if not records:
            return
        if self.spool is None:
            log.error("ledger: %d records lost (no spool configured)", len(records))
            return
        led = self.ledger
        try:
            n = self.spool.append((led.run_id, led.policy, str(led.kind)), records)
        except Exception:  # noqa: BLE001 - the disk failed too: say so, the writer goes on
            log.exception("ledger: could not write %d records to the spool %s", len(records), self.spool.path)
            return
        with self._stats_lock:
            self.spooled += n


def _parent_of(pid: int) -> int | None:
    try:  # field 4 of /proc/<pid>/stat (after the parenthesised command name)
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _release(waiters: list[Any]) -> None:
    """Wake flush() callers (threading.Event) and wait_durable() callers (futures of their event loops)."""
    by_loop: dict[Any, list[asyncio.Future[None]]] = {}
    for w in waiters:
        if isinstance(w, threading.Event):
            w.set()
        else:
            by_loop.setdefault(w.get_loop(), []).append(w)
    for loop, futs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_resolve, futs)


def _resolve(futs: list[asyncio.Future[None]]) -> None:
    for f in futs:
        if not f.done():  # cancelled: the client went away
            f.set_result(None)
