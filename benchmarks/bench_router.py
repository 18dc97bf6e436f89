"""Router overhead: added TTFT (p50/p99) and max requests/s of `orchestrator serve` vs the engine directly.

One run starts a fast engine stub (benchmarks/stub_engine.py, answers instantly) and `orchestrator serve`
in front of it (backend vllm, one colocated engine, conserve policy, SQLite ledger written by the
background writer: every turn is recorded), then measures from this process with aiohttp:

1. latency: sequential streaming chat requests (1 connection), alternating direct/router in blocks;
   TTFT = request sent -> first `data:` chunk with content. Added TTFT = router - direct (p50, p99).
2. throughput: `--concurrency` connections for `--duration-s` each, streaming and non-streaming, against
   the stub directly and through the router; req/s and the router's CPU time per request (from /proc).

All three processes share this machine's cores, so the direct figure is also what the load generator
itself can drive; the ratio router/direct is the honest comparison. Targets (issue 4): <= 1 ms p99 added
TTFT, >= 2,000 requests/s.

    python benchmarks/bench_router.py [--requests 2000] [--duration-s 8] [--concurrency 64] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
MODEL = "Qwen3-0.6B"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def _wait_up(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _body(stream: bool, max_tokens: int) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    ).encode()


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool) -> float:
    """Returns TTFT (s) for streams, total latency for JSON."""
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {(await r.text())[:200]}")
        if not stream:
            await r.read()
            return time.perf_counter() - t0
        ttft = None
        async for line in r.content:
            if ttft is None and line.startswith(b"data: {") and b'"choices":[{' in line:
                ttft = time.perf_counter() - t0
        assert ttft is not None
        return ttft


async def latency(
    direct: str, router: str, n: int, max_tokens: int, block: int = 50
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"direct": [], "router": []}
    body = _body(True, max_tokens)
    conn = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=conn) as s:
        for _ in range(20):  # warm-up both paths
            await _one(s, direct, body, True)
            await _one(s, router, body, True)
        done = 0
        while done < n:
            for name, url in (("direct", direct), ("router", router)):
                for _ in range(block):
                    out[name].append(await _one(s, url, body, True))
            done += block
    return out


async def throughput(
    url: str, concurrency: int, duration_s: float, stream: bool, max_tokens: int
) -> dict[str, Any]:
    body = _body(stream, max_tokens)
    conn = aiohttp.TCPConnector(limit=concurrency)
    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=conn) as s:
        stop_at = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                try:
                    lat.append(await _one(s, url, body, stream))
                except Exception:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {
        "requests": len(lat),
        "errors": errors,
        "elapsed_s": elapsed,
        "req_per_s": len(lat) / elapsed,
        "p50_ms": _pct(lat, 50) * 1e3 if lat else None,
        "p99_ms": _pct(lat, 99) * 1e3 if lat else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="sequential requests per path (latency)")
    ap.add_argument("--duration-s", type=float, default=8.0, help="seconds per throughput run")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
    stub_port, router_port = _free_port(), _free_port()
    fleet = tmp / "fleet.yaml"
    fleet.write_text(
        f"model: {MODEL}\n"
        "tiers:\n  - {name: stub, gpu: A40, count: 1, roles: [colocated]}\n"
        "backend: vllm\n"
        f"engines:\n  - {{id: stub-0, tier: stub, role: colocated, url: 'http://127.0.0.1:{stub_port}'}}\n"
        f"database_url: sqlite:///{tmp / 'ledger.db'}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    stub = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "stub_engine.py"), "--port", str(stub_port)], env=env
    )
    router = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from orchestrator.cli import main; main()",
            "serve",
            "--fleet",
            str(fleet),
            "--port",
            str(router_port),
            "--log-level",
            "warning",
            "--json",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    direct_url = f"http://127.0.0.1:{stub_port}/v1/chat/completions"
    router_url = f"http://127.0.0.1:{router_port}/v1/chat/completions"
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.platform()}",
        "args": vars(args),
    }
    try:
        asyncio.run(_wait_up(f"http://127.0.0.1:{stub_port}/health"))
        asyncio.run(_wait_up(f"http://127.0.0.1:{router_port}/ready"))
        lat = asyncio.run(latency(direct_url, router_url, args.requests, args.max_tokens))
        d50, d99 = _pct(lat["direct"], 50) * 1e3, _pct(lat["direct"], 99) * 1e3
        r50, r99 = _pct(lat["router"], 50) * 1e3, _pct(lat["router"], 99) * 1e3
        result["ttft_ms"] = {
            "direct_p50": d50,
            "direct_p99": d99,
            "router_p50": r50,
            "router_p99": r99,
            "added_p50": r50 - d50,
            "added_p99": r99 - d99,
            "added_mean": (statistics.mean(lat["router"]) - statistics.mean(lat["direct"])) * 1e3,
        }
        tp: dict[str, Any] = {}
        for stream in (True, False):
            mode = "stream" if stream else "json"
            tp[f"direct_{mode}"] = asyncio.run(
                throughput(direct_url, args.concurrency, args.duration_s, stream, args.max_tokens)
            )
            cpu0 = _cpu_s(router.pid)
            tp[f"router_{mode}"] = r = asyncio.run(
                throughput(router_url, args.concurrency, args.duration_s, stream, args.max_tokens)
            )
            r["router_cpu_us_per_request"] = (_cpu_s(router.pid) - cpu0) / max(1, r["requests"]) * 1e6
            r["ratio_vs_direct"] = r["req_per_s"] / tp[f"direct_{mode}"]["req_per_s"]
        result["throughput"] = tp
    finally:
        for p in (router, stub):
            p.terminate()
        for p in (router, stub):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    t = result["ttft_ms"]
    print(f"machine: {result['machine']}")
    print(
        f"TTFT direct p50 {t['direct_p50']:.3f} ms p99 {t['direct_p99']:.3f} ms | via router p50 "
        f"{t['router_p50']:.3f} ms p99 {t['router_p99']:.3f} ms | added p50 {t['added_p50']:.3f} ms "
        f"p99 {t['added_p99']:.3f} ms (target <= 1 ms p99)"
    )
    for k, v in result["throughput"].items():
        extra = (
            f", ratio {v['ratio_vs_direct']:.2f}, router CPU {v['router_cpu_us_per_request']:.0f} us/req"
            if "ratio_vs_direct" in v
            else ""
        )
        print(
            f"{k:14s} c={args.concurrency}: {v['req_per_s']:8.0f} req/s ({v['requests']} ok, {v['errors']} "
            f"errors), p50 {v['p50_ms']:.2f} ms p99 {v['p99_ms']:.2f} ms{extra}"
        )


if __name__ == "__main__":
    main()
