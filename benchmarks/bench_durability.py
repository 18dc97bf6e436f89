"""The cost of durability before the last byte: how long an answer waits for its turn's group commit.

Drives orchestrator/ledger_writer.py's LedgerWriter (worker process, as `serve` runs it) the way the router
does: each "answer" queues its turn and awaits ``wait_durable()``. With C concurrent answerers (closed loop),
it reports the wait per answer (p50/p99), answers per second, turns per transaction, and the CPU of the
serving side (this process: committer and executor threads) and of the worker process per turn. One-turn
conversations (each turn final: the heaviest write, its conversation summary is updated too).

    python benchmarks/bench_durability.py [--db sqlite|postgres URL] [--turns 2000] [--conc 1,8,64]

SQLite is a file in a temporary directory (WAL, synchronous=FULL: a commit is an fsync). For PostgreSQL pass
a URL (postgresql+psycopg://...) of an empty database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from energy.ledger import Ledger  # noqa: E402
from energy.records import RunKind, TurnRecord, TurnStatus  # noqa: E402
from orchestrator.ledger_writer import LedgerWriter  # noqa: E402


def _turn(i: int) -> TurnRecord:
    at = datetime.now(UTC)
    return TurnRecord(
        conversation_id=f"c{i}", turn=1, request_id=f"r{i}", instance_id="d0", arrival_at=at,
        first_token_at=at + timedelta(milliseconds=5), last_token_at=at + timedelta(milliseconds=50),
        prompt_tokens=100, output_tokens=8, finish_reason="stop", is_final=True, status=TurnStatus.OK,
        prefill_instance_id=None, remote_prefill=False, tier="a40", cached_tokens=0, policy="conserve",
    )  # fmt: skip


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def _run(writer: LedgerWriter, turns: int, conc: int, start: int) -> dict[str, Any]:
    waits: list[float] = []
    next_i = start
    stop = start + turns

    async def answerer() -> None:
        nonlocal next_i
        while next_i < stop:
            i, next_i = next_i, next_i + 1
            t0 = time.perf_counter()
            writer.turn(_turn(i))
            await writer.wait_durable()
            waits.append(time.perf_counter() - t0)

    batches0, me0 = writer.batches, _cpu_s(os.getpid())
    worker0 = _cpu_s(writer.pid) if writer.pid else 0.0
    t0 = time.perf_counter()
    await asyncio.gather(*(answerer() for _ in range(conc)))
    elapsed = time.perf_counter() - t0
    worker1 = _cpu_s(writer.pid) if writer.pid else 0.0
    return {
        "concurrency": conc,
        "turns": turns,
        "wait_p50_ms": _pct(waits, 50) * 1e3,
        "wait_p99_ms": _pct(waits, 99) * 1e3,
        "answers_per_s": turns / elapsed,
        "turns_per_commit": turns / max(1, writer.batches - batches0),
        "server_cpu_us_per_turn": (_cpu_s(os.getpid()) - me0) / turns * 1e6,
        "worker_cpu_us_per_turn": (worker1 - worker0) / turns * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default="sqlite", help="'sqlite' (a temporary file) or a SQLAlchemy URL")
    ap.add_argument("--turns", type=int, default=2000, help="turns per concurrency level and repetition")
    ap.add_argument("--conc", default="1,8,64", help="concurrent answerers, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    url = (
        f"sqlite:///{tempfile.mkdtemp(prefix='bench-durability-')}/ledger.db"
        if args.db == "sqlite"
        else args.db
    )
    ledger = Ledger(url, run_id="bench", policy="conserve", kind=RunKind.SERVE)
    ledger.upgrade()
    ledger.start_run()
    writer = LedgerWriter(ledger, nice=0)  # as serve runs it with durability on
    writer.wait_ready(120)
    out: dict[str, Any] = {"db": ledger.dialect, "loadavg_start": os.getloadavg(), "levels": []}
    start = 0
    try:
        for conc in (int(c) for c in args.conc.split(",")):
            reps = []
            for _ in range(args.reps):
                reps.append(asyncio.run(_run(writer, args.turns, conc, start)))
                start += args.turns
            med = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
            out["levels"].append({"median": med, "reps": reps})
    finally:
        writer.close()
        ledger.close()
    out["loadavg_end"] = os.getloadavg()
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{out['db']}, load average {out['loadavg_start']} -> {out['loadavg_end']}, medians of {args.reps}")
    for lv in out["levels"]:
        m = lv["median"]
        print(
            f"concurrency {m['concurrency']:3.0f}: wait p50 {m['wait_p50_ms']:.2f} ms "
            f"p99 {m['wait_p99_ms']:.2f} ms | "
            f"{m['answers_per_s']:.0f} answers/s | {m['turns_per_commit']:.1f} turns/commit | CPU per turn: "
            f"server {m['server_cpu_us_per_turn']:.0f} us, worker {m['worker_cpu_us_per_turn']:.0f} us"
        )


if __name__ == "__main__":
    main()
