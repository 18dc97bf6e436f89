"""The ledger writer's worker side (orchestrator/ledger_writer.py runs it in a one-worker process pool, or a
thread): :class:`LedgerBatchWriter` writes one batch of records (pins, then turns, retried with back-off,
duplicates skipped, then energy jobs), and the pool's initializer and task functions give the worker process
its own ledger connection, its CPU priority, its signal handling and its exit when the server is gone.

Must not import fastapi.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from energy.errors import DuplicateTurnError, EnergyError
from energy.records import PinRecord, TurnRecord, turn_from_wire, turn_to_wire

log = logging.getLogger("conserve.ledger_writer")  # one logger for the writer, whichever side logs

# Back-off of a failed batch: first wait, and the cap (also the point where shutdown gives up).
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 5.0


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one batch did (the worker returns it; the parent sums them)."""

    turns: int = 0
    pins: int = 0
    failed_batches: int = 0  # failed tries (each retried)
    samples: int = 0
    attributions: int = 0
    failed_energy_jobs: int = 0
    last_error: str | None = None
    pid: int = 0
    # records given up at shutdown (pins, turns as wire tuples): the parent keeps them in its spool
    given_up: tuple[Any, ...] = ()


class LedgerBatchWriter:
    """Writes batches of records synchronously: pins, then turns (retried with back-off, duplicates skipped),
    then energy jobs. Once ``closing`` is set (shutdown) a failing batch is given up when the back-off is at
    its cap.
    """

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger
        self.closing = threading.Event()

    def write_batch(self, records: Sequence[Any]) -> BatchResult:
        pins: list[PinRecord] = []
        turns: list[TurnRecord] = []
        jobs: list[Any] = []
        for rec in records:
            if type(rec) is tuple:  # a turn as turn_to_wire made it
                turns.append(turn_from_wire(rec))
            elif isinstance(rec, TurnRecord):
                turns.append(rec)
            elif isinstance(rec, PinRecord):
                pins.append(rec)
            else:
                jobs.append(rec)
        stats: dict[str, Any] = {"turns": 0, "pins": 0, "failed_batches": 0, "last_error": None}
        self._write(pins, turns, stats)
        n_samples = n_rows = failed_jobs = 0
        for job in jobs:
            try:
                from energy.accounting import run_energy_job

                s, r = run_energy_job(self.ledger, job)
                n_samples, n_rows = n_samples + s, n_rows + r
            except Exception as err:  # noqa: BLE001 - SQL or conservation errors: logged, the writer goes on
                # not retried: samples and rows are separate transactions, a retry could write samples twice
                failed_jobs += 1
                stats["last_error"] = f"energy attribution failed: {type(err).__name__}: {err}"
                log.error("%s (%d intervals not attributed)", stats["last_error"], len(job.intervals))
        return BatchResult(
            samples=n_samples, attributions=n_rows, failed_energy_jobs=failed_jobs, pid=os.getpid(), **stats
        )

    def _write(self, pins: list[PinRecord], turns: list[TurnRecord], stats: dict[str, Any]) -> None:
        delay_s = RETRY_FIRST_S
        while pins or turns:
            try:
                if pins:
                    self.ledger.record_pins(pins)
                    stats["pins"] += len(pins)
                    pins = []
                if turns:
                    self.ledger.record_turns(turns)
                    stats["turns"] += len(turns)
                    turns = []
            except DuplicateTurnError as err:  # already written (e.g. by a worker that died after its commit)
                log.warning("ledger: %s; writing the rest", err)
                stats["last_error"] = str(err)
                turns = [t for t in turns if t.request_id not in err.request_ids]
            except EnergyError as err:
                stats["failed_batches"] += 1
                stats["last_error"] = str(err)
                if self.closing.is_set() and delay_s >= RETRY_MAX_S:
                    log.error("ledger write failed at shutdown: %d pins and %d turns go to the spool: %s",
                              len(pins), len(turns), err)  # fmt: skip
                    stats["given_up"] = (*pins, *(turn_to_wire(t) for t in turns))
                    return
                log.error("ledger write failed (retrying in %.2f s): %s", delay_s, err)
                time.sleep(delay_s)
                delay_s = min(RETRY_MAX_S, delay_s * 2)


# ---- the worker process's side -----------------------------------------------------------------------

_worker: LedgerBatchWriter | None = None
_worker_busy = threading.Lock()  # held while a batch is written
# The worker checks this often whether the server is still its parent (a killed server must not leave it
# behind: it holds both ends of the pool's call queue, so it would wait for work forever).
ORPHAN_CHECK_S = 0.5


def _worker_init(
    url: str, run_id: str, policy: str | None, kind: str, parent: int, closing: bool, nice: int
) -> None:
    """Initializer of the pool's worker process: its own ledger connection, background CPU priority. It
    ignores SIGINT/SIGTERM (Ctrl-C or `timeout` signal the whole process group): the server closes it after
    its last records. SIGUSR1 from the server (``LedgerWriter.close``) means shutting down: a failing batch
    is given up once its back-off is at the cap. If the server dies (kill -9), the worker finishes the batch
    in hand (or gives it up as at shutdown) and exits."""
    import signal

    from energy.ledger import Ledger
    from energy.records import RunKind

    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, 0) < nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    _worker = writer = LedgerBatchWriter(Ledger(url, run_id=run_id, policy=policy, kind=RunKind(kind)))
    if closing:
        writer.closing.set()
    signal.signal(signal.SIGUSR1, lambda *_: writer.closing.set())

    def exit_when_orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_CHECK_S)
        writer.closing.set()
        with _worker_busy:  # the batch being written is committed (or rolled back) first
            os._exit(0)

    threading.Thread(target=exit_when_orphaned, name="conserve-ledger-orphan-check", daemon=True).start()


def _worker_write(records: Sequence[Any]) -> BatchResult:
    assert _worker is not None, "ledger worker not initialised"
    with _worker_busy:
        return _worker.write_batch(records)
