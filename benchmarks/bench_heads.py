"""Latency of the conversation-heads statements replicas decide turns with (energy/heads.py), alone.

1,000 sequential calls of each on one PgConversationHeads (its psycopg async connections, as `serve` uses
them): a claim of a new conversation, a claim of the next turn of one of 50, a pin compare-and-set, a
finish. Reports p50 and p99 in ms.

    python benchmarks/bench_heads.py --db postgresql+psycopg://USER@HOST:PORT/DB [--calls 1000] [--json]

The database gets the ledger schema (Ledger.upgrade) and rows with conversation ids ``cc-...``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from energy.heads import PgConversationHeads  # noqa: E402
from energy.ledger import Ledger  # noqa: E402


async def _run(url: str, calls: int) -> dict[str, Any]:
    s = PgConversationHeads(url, pin_ttl_s=900, run_id="bench-heads")
    stamp = f"{time.time_ns()}"
    await s.claim(f"cc-warm-{stamp}", datetime.now(UTC))
    out: dict[str, Any] = {}
    for name in ("claim_new", "claim_next", "move_pin", "finish"):
        xs = []
        for i in range(calls):
            cid = f"cc-{stamp}-new-{i}" if name == "claim_new" else f"cc-{stamp}-{i % 50}"
            t0 = time.perf_counter()
            if name.startswith("claim"):
                await s.claim(cid, datetime.now(UTC))
            elif name == "move_pin":
                await s.move_pin(cid, None if i < 50 else "d0", "d0")
            else:
                await s.finish(cid, 1, context_tokens=10, decoder="d0", ended=False, at=datetime.now(UTC))
            xs.append((time.perf_counter() - t0) * 1e3)
        xs.sort()
        out[name] = {"p50_ms": xs[len(xs) // 2], "p99_ms": xs[min(len(xs) - 1, int(len(xs) * 0.99))]}
    await s.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True, help="a PostgreSQL ledger URL (postgresql+psycopg://...)")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with Ledger(args.db) as lg:
        lg.upgrade()
    res = asyncio.run(_run(args.db, args.calls))
    if args.json:
        print(json.dumps(res, indent=2))
        return
    for name, r in res.items():
        print(f"{name:10s} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms")


if __name__ == "__main__":
    main()
