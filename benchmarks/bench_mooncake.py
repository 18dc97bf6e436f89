"""Mooncake trace loading time vs trace length (orchestrator.workload.load_mooncake).

Writes a synthetic Mooncake-format trace (JSONL: timestamp, input_length, output_length, hash_ids of 512-token
blocks) of --rows requests and times load_mooncake on it, median of --repeats. The trace: a 3-block system
prompt shared by every conversation; 40% of requests start a conversation (turn-1 prompt = system prompt + up
to 3,000 tokens, its last block partial), 60% continue one of the 200 most recent open conversations
(history + output + 50-2,000 appended tokens; a conversation closes with probability 0.2 per turn). This is
the shape that made the earlier loader quadratic: every turn 1 files its conversation under the shared
prefix. Deterministic for --seed. Run (under the heavy lock on the shared VM):
    flock /tmp/conserve-heavy.lock python benchmarks/bench_mooncake.py --rows 12000,120000 [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from orchestrator.workload import load_mooncake

BLOCK = 512


def write_trace(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    system = [0, 1, 2]
    next_block, ts = 10, 0
    open_convs: list[list] = []  # [hash_ids, input_length, output_length]
    with path.open("w") as fh:
        for _ in range(rows):
            ts += rng.randint(1, 400)
            if open_convs and rng.random() < 0.6:
                c = rng.choice(open_convs)
                in_len = c[1] + c[2] + rng.randint(50, 2000)
                full = c[1] // BLOCK  # the previous prompt's complete blocks are reused
                blocks = -(-in_len // BLOCK)
                c[0] = c[0][:full] + list(range(next_block, next_block + blocks - full))
                next_block += blocks - full
                c[1], c[2] = in_len, rng.randint(10, 500)
                if rng.random() < 0.2:
                    open_convs.remove(c)
            else:
                in_len = 3 * BLOCK + rng.randint(1, 3000)
                blocks = -(-in_len // BLOCK)
                c = [system + list(range(next_block, next_block + blocks - 3)), in_len, rng.randint(10, 500)]
                next_block += blocks - 3
                open_convs.append(c)
                if len(open_convs) > 200:
                    open_convs.pop(0)
            rec = {"timestamp": ts, "input_length": c[1], "output_length": c[2], "hash_ids": c[0]}
            fh.write(json.dumps(rec) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="12000,120000", help="comma-separated trace lengths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (int(x) for x in args.rows.split(",")):
            path = Path(tmp) / f"trace-{rows}.jsonl"
            write_trace(path, rows, args.seed)
            times, convs = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                convs = load_mooncake(path)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            print(
                f"{rows:>7} rows ({path.stat().st_size / 1e6:.1f} MB): {len(convs)} conversations, median "
                f"{med:.3f} s (min {min(times):.3f}, max {max(times):.3f}), {rows / med:,.0f} rows/s",
                flush=True,
            )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
