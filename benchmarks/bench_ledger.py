"""Ledger write cost per served turn: what the ledger writer process spends on each one-turn conversation
(conversation row, turn row, summary refresh), in batches as the server ships them.

    python benchmarks/bench_ledger.py [--db URL] [--batch 500] [--batches 20] [--reps 3] [--json]

Default database: a fresh SQLite file in a temporary directory. With ``--db postgresql+psycopg://...`` it
writes into that database (a new run per repetition). CPU time is this process's (time.process_time), i.e.
the Python and driver work; "elapsed" adds the database server's work and the round trips.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _batch(k: int, n: int, t0: datetime) -> list[Any]:
    from energy.records import TurnRecord, TurnStatus

    out = []
    for i in range(n):
        at = t0 + timedelta(seconds=k, microseconds=i)
        out.append(
            TurnRecord(
                f"conv-{k}-{i}", 1, f"req-{k}-{i}", "stub-0", at, at + timedelta(milliseconds=1),
                at + timedelta(milliseconds=2), 20, 8, "length", True, TurnStatus.OK, None, False, "stub", 0,
            )
        )  # fmt: skip
    return out


def run(url: str, batch: int, batches: int, reps: int) -> dict[str, Any]:
    from energy.ledger import Ledger

    out: list[float] = []
    wall: list[float] = []  # elapsed, including the database server's work and round trips
    for rep in range(reps):
        ledger = Ledger(url, run_id=f"bench-{rep}-{time.time_ns()}", policy="conserve")
        ledger.upgrade()
        ledger.start_run()
        t0 = datetime.now(UTC)
        data = [_batch(k, batch, t0) for k in range(batches + 2)]
        for b in data[:2]:  # warm-up: statement compilation, connection pool
            ledger.record_turns(b)
        c0, w0 = time.process_time(), time.perf_counter()
        for b in data[2:]:
            ledger.record_turns(b)
        out.append((time.process_time() - c0) / (batch * batches) * 1e6)
        wall.append((time.perf_counter() - w0) / (batch * batches) * 1e6)
        ledger.close()
    return {
        "us_per_turn_reps": out,
        "us_per_turn_median": statistics.median(out),
        "wall_us_per_turn_median": statistics.median(wall),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default=None, help="ledger URL (default: a temporary SQLite file)")
    ap.add_argument("--batch", type=int, default=500, help="turns per batch (the server's ledger_batch_max)")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as d:
        url = args.db or f"sqlite:///{Path(d) / 'ledger.db'}"
        res = run(url, args.batch, args.batches, args.reps)
    res["db"] = url.split(":", 1)[0]
    import provenance  # benchmarks/provenance.py: this script's directory is on sys.path

    res["commit"], res["machine"] = provenance.commit(), provenance.machine()
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(
        f"commit {res['commit']}, {res['db']}, batches of {args.batch}: "
        f"{res['us_per_turn_median']:.1f} us CPU per one-turn conversation "
        f"(median of {args.reps}: {', '.join(f'{x:.1f}' for x in res['us_per_turn_reps'])}); "
        f"elapsed {res['wall_us_per_turn_median']:.1f} us per conversation"
    )


if __name__ == "__main__":
    main()
