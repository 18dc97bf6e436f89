"""Write the synthetic Mooncake-format trace examples/traces/mooncake-agentic.jsonl (the trace of
examples/fleet-mooncake.yaml).

Mooncake's JSONL (one request per line: ``timestamp`` ms from the trace start, ``input_length``,
``output_length``, ``hash_ids`` of 512-token blocks; equal ids = equal content), shaped like an agent's
traffic: a 2-block system prompt shared by every conversation; conversations arrive as a Poisson stream
(--rate per second); a turn-1 prompt of the system prompt + a lognormal task (median 4,000 tokens, sigma
0.5); 2-8 turns (uniform); each later turn appends a tool result of 50-1,500 tokens (uniform) to the whole
history (the previous prompt's complete blocks keep their ids, its partial last block and the new tokens get
new ones);
outputs of 30-500 tokens (uniform); the next request is sent after the previous turn's modelled service time
(30 ms per output token) and a tool call of 1-8 s (uniform). Nothing here is measured: a synthetic trace in
the real format, so `orchestrator.workload.load_mooncake` regroups its requests into conversations by their
block prefixes as it would for a real trace. Deterministic for --seed. Run:
    python examples/traces/make_mooncake_trace.py --conversations 240 --rate 1.5 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

BLOCK = 512
SYSTEM_BLOCKS = 2
SERVICE_S_PER_OUTPUT_TOKEN = 0.03  # a modelled decode pace for the send times; not a measurement


def requests(conversations: int, rate_per_s: float, seed: int) -> list[tuple[float, int, int, list[int]]]:
    rng = random.Random(seed)
    next_block = 1000
    out: list[tuple[float, int, int, list[int]]] = []
    t = 0.0
    for _ in range(conversations):
        t += rng.expovariate(rate_per_s)
        in_len = SYSTEM_BLOCKS * BLOCK + int(math.exp(rng.gauss(math.log(4000), 0.5)))
        blocks = -(-in_len // BLOCK)
        hashes = list(range(SYSTEM_BLOCKS)) + list(range(next_block, next_block + blocks - SYSTEM_BLOCKS))
        next_block += blocks - SYSTEM_BLOCKS
        ts, out_len = t, 0
        for k in range(rng.randint(2, 8)):
            if k:
                ts += out_len * SERVICE_S_PER_OUTPUT_TOKEN + rng.uniform(1.0, 8.0)
                keep = in_len // BLOCK  # complete blocks of the previous prompt keep their content
                in_len = in_len + out_len + rng.randint(50, 1500)
                blocks = -(-in_len // BLOCK)
                hashes = hashes[:keep] + list(range(next_block, next_block + blocks - keep))
                next_block += blocks - keep
            out_len = rng.randint(30, 500)
            out.append((ts, in_len, out_len, list(hashes)))
    out.sort(key=lambda r: r[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=240)
    ap.add_argument("--rate", type=float, default=1.5, help="conversations per second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("mooncake-agentic.jsonl"))
    a = ap.parse_args()
    with a.out.open("w") as fh:
        for ts, in_len, out_len, hashes in requests(a.conversations, a.rate, a.seed):
            rec = {"timestamp": round(ts * 1000), "input_length": in_len, "output_length": out_len}
            fh.write(json.dumps({**rec, "hash_ids": hashes}, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
