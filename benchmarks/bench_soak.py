"""Soak: does `orchestrator serve` keep its memory flat under many concurrent conversations? (issue 13 item 5)

Starts `orchestrator serve` (its own process; simulated engines; the fleet's ledger, a fresh SQLite file in a
temporary directory unless ``--db``) and drives it from this process with ``--conversations`` concurrent
streaming conversations for ``--duration-s``: each client runs a conversation of 2-8 turns (its history
grows by the answer and a tool result every turn; no think time), marks the last turn final
(``X-Conversation-Final: true``) and starts the next conversation under a new id. So conversations end all
the time and new ones begin: a router that keeps anything per ended conversation grows.

Every ``--sample-s`` it reads the resident set size (VmRSS, /proc/<pid>/status) of the server process and of
its children (the ledger writer processes). The result: RSS at the end of warm-up and at the end, the slope
of a least-squares line through the server's samples after ``--warmup-s`` (MB/min; target < 1 MB/min), turns
answered, conversations ended, errors (non-200 answers, streams without ``[DONE]``, connection errors).

    python benchmarks/bench_soak.py [--conversations 1000] [--duration-s 600] [--warmup-s 120] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
TARGET_SLOPE_MB_PER_MIN = 1.0  # issue 13 item 5
# the router benchmark's process helpers (this directory is on sys.path)
from bench_router import _children as children  # noqa: E402
from bench_router import _free_port  # noqa: E402

SYSTEM = "You are a coding agent. Tools: bash, edit, search. Answer with one tool call per turn. " * 12


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MB (VmRSS of /proc/<pid>/status, kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 2:
        return float("nan")
    ts, ys = [t for t, _ in samples], [y for _, y in samples]
    return statistics.linear_regression(ts, ys).slope * 60.0


class Load:
    def __init__(self, url: str, model: str, seed: int) -> None:
        self.url = url
        self.model = model
        self.rng = random.Random(seed)
        self.turns = 0
        self.conversations = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.stop_at = 0.0

    def _error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    async def _turn(self, session: Any, cid: str, msgs: list[dict[str, Any]], final: bool) -> str | None:
        headers = {"X-Conversation-Id": cid, "Content-Type": "application/json"}
        if final:
            headers["X-Conversation-Final"] = "true"
        body = {"model": self.model, "messages": msgs, "max_tokens": 16, "stream": True}
        try:
            async with session.post(self.url, json=body, headers=headers) as r:
                if r.status != 200:
                    self._error(f"http {r.status}")
                    await r.read()
                    return None
                text: list[str] = []
                done = False
                async for line in r.content:
                    if line.startswith(b"data: [DONE]"):
                        done = True
                    elif line.startswith(b"data: {"):
                        for c in json.loads(line[6:]).get("choices") or ():
                            text.append((c.get("delta") or {}).get("content") or "")
                if not done:
                    self._error("stream without [DONE]")
                    return None
        except Exception as err:  # noqa: BLE001 - counted, the client goes on
            self._error(type(err).__name__)
            return None
        self.turns += 1
        return "".join(text)

    async def client(self, session: Any, k: int) -> None:
        n = 0
        while time.monotonic() < self.stop_at:
            n += 1
            cid = f"soak-{k}-{n}"
            msgs: list[dict[str, Any]] = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Task {k}.{n}: fix the failing test."},
            ]
            turns = self.rng.randint(2, 8)
            for t in range(1, turns + 1):
                answer = await self._turn(session, cid, msgs, final=t == turns)
                if answer is None or time.monotonic() >= self.stop_at:
                    break
                msgs += [
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": f"Tool result {t}: 3 passed, 1 failed."},
                ]
            else:
                self.conversations += 1


async def _drive(args: argparse.Namespace, url: str, pid: int) -> dict[str, Any]:
    import aiohttp

    load = Load(url, args.model, args.seed)
    t0 = time.monotonic()
    load.stop_at = t0 + args.duration_s
    samples: list[tuple[float, float, float]] = []  # (s since start, server MB, children MB)

    async def sampler() -> None:
        while time.monotonic() < load.stop_at:
            kids = sum(rss_mb(c) for c in children(pid) if Path(f"/proc/{c}").exists())
            samples.append((time.monotonic() - t0, rss_mb(pid), kids))
            await asyncio.sleep(args.sample_s)

    timeout = aiohttp.ClientTimeout(total=120)
    conn = aiohttp.TCPConnector(limit=args.conversations)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        await asyncio.gather(sampler(), *(load.client(session, k) for k in range(args.conversations)))
    elapsed = time.monotonic() - t0
    after = [(t, mb) for t, mb, _ in samples if t >= args.warmup_s]
    after_kids = [(t, mb) for t, _, mb in samples if t >= args.warmup_s]
    return {
        "turns": load.turns,
        "turns_per_s": load.turns / elapsed,
        "conversations_ended": load.conversations,
        "errors": load.errors,
        "error_kinds": load.error_kinds,
        "elapsed_s": elapsed,
        "rss_server_mb_start": samples[0][1] if samples else None,
        "rss_server_mb_after_warmup": after[0][1] if after else None,
        "rss_server_mb_end": samples[-1][1] if samples else None,
        "rss_server_mb_max": max(mb for _, mb, _ in samples) if samples else None,
        "rss_server_slope_mb_per_min": slope_mb_per_min(after),
        "rss_children_mb_end": samples[-1][2] if samples else None,
        "rss_children_slope_mb_per_min": slope_mb_per_min(after_kids),
        "samples": [(round(t, 1), round(a, 2), round(b, 2)) for t, a, b in samples],
    }


def _wait_up(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"orchestrator serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready within {timeout_s:.0f} s")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import provenance  # benchmarks/provenance.py

    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    port = _free_port()
    db = args.db or f"sqlite:///{tmp / 'ledger.db'}"
    argv = [sys.executable, "-c", "from orchestrator.cli import main; main()", "serve"]
    argv += ["--fleet", args.fleet, "--port", str(port), "--db", db, "--sim-speedup", str(args.sim_speedup)]
    argv += ["--log-level", "warning", "--json"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_up(base, proc)
        import urllib.request

        with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
            model = json.loads(r.read())["data"][0]["id"]
        args.model = model
        result = asyncio.run(_drive(args, base + "/v1/chat/completions", proc.pid))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    result.update(
        {
            "command": "python benchmarks/bench_soak.py " + " ".join(sys.argv[1:]),
            "machine": provenance.machine(),
            "commit": provenance.commit(),
            "loadavg_end": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
            "target_slope_mb_per_min": TARGET_SLOPE_MB_PER_MIN,
            "serve_log_tail": log.read_text(errors="replace")[-2000:],
        }
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=1000, help="concurrent conversations (clients)")
    ap.add_argument("--duration-s", type=float, default=600.0)
    ap.add_argument("--warmup-s", type=float, default=120.0, help="samples before this are not in the slope")
    ap.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period")
    ap.add_argument("--fleet", default="examples/fleet.yaml")
    ap.add_argument("--db", default=None, help="ledger URL (default: a new SQLite file)")
    ap.add_argument("--sim-speedup", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(
        f"{res['turns']} turns ({res['turns_per_s']:.0f}/s), {res['conversations_ended']} conversations "
        f"ended, {res['errors']} errors {res['error_kinds']}\n"
        f"server RSS: {res['rss_server_mb_start']:.1f} MB at start, "
        f"{res['rss_server_mb_after_warmup']:.1f} MB after warm-up, {res['rss_server_mb_end']:.1f} MB at the "
        f"end (max {res['rss_server_mb_max']:.1f}); "
        f"slope after warm-up {res['rss_server_slope_mb_per_min']:+.3f} MB/min (target < "
        f"{TARGET_SLOPE_MB_PER_MIN})\nledger writer processes: {res['rss_children_mb_end']:.1f} MB, slope "
        f"{res['rss_children_slope_mb_per_min']:+.3f} MB/min\n{res['machine']}, commit {res['commit']}"
    )


if __name__ == "__main__":
    main()
