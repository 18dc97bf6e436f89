"""The router's own CPU per request, in process: the ASGI app (fast path, router, metrics, ledger hand-off)
driven directly, with an engine whose stream is the stub engine's canned bytes. No sockets, no HTTP server,
no load generator: what is left is the Python work ConServe adds per request, so code changes can be
compared with far less noise than benchmarks/bench_router.py (whose figures include uvicorn, the kernel and
CPU sharing).

    python benchmarks/bench_router_inproc.py [--requests 20000] [--reps 3] [--engines 1] [--concurrency 1]
                                             [--tree PATH] [--json]

``--concurrency C`` keeps C requests in flight (C loops, each sending its next request when one ends), so
answers share group commits as they do under load (1: one at a time, a commit per answer).
``--engines N`` puts N colocated engines in the fleet (all answering with the same canned bytes): placement
then looks at N instances per request, as a router in front of a real fleet does.

Reports the event-loop thread's CPU per request (time.thread_time) and the whole process's
(time.process_time: adds the ledger writer's committer and pool threads and the energy accounting threads),
each other thread's CPU per request by name and the ledger writer process's (from /proc), the event loop's
voluntary context switches (its sleeps: one per await that found nothing ready) and the ledger commits per
request. ``--tree PATH`` measures another checkout's code with this script (e.g. the commit before a
change, in a `git worktree`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

MODEL = "Qwen3-0.6B"
BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
        "max_tokens": 8,
        "stream": True,
    }
).encode()
SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/v1/chat/completions",
    "raw_path": b"/v1/chat/completions",
    "query_string": b"",
    "root_path": "",
    "headers": [
        (b"host", b"bench"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
    ],
    "client": ("127.0.0.1", 1),
    "server": ("127.0.0.1", 2),
}


async def _run(requests: int, reps: int, tmp: Path, engines: int = 1, concurrency: int = 1) -> dict[str, Any]:
    from stub_engine import _chunks

    from api.app import create_app
    from orchestrator.runtime import ServeSettings, build_runtime

    fleet = tmp / "fleet.yaml"
    listed = "".join(
        f"  - {{id: stub-{i}, tier: stub, role: colocated, url: 'http://127.0.0.1:{9 + i}'}}\n"
        for i in range(engines)
    )
    fleet.write_text(
        f"model: {MODEL}\n"
        f"tiers:\n  - {{name: stub, gpu: A40, count: {engines}, roles: [colocated]}}\n"
        "backend: vllm\n"
        f"engines:\n{listed}"
        f"database_url: sqlite:///{tmp / 'ledger.db'}\n"
    )
    settings = ServeSettings(fleet=fleet, port=0, poll_interval_s=3600.0)  # no health polls of ports 9...
    rt = build_runtime(settings)
    app = create_app(settings, runtime=rt)
    canned = _chunks(True, 8, 8, True)  # what the stub engine answers: 8 tokens, usage, [DONE]

    async def stream_raw(req: Any) -> AsyncIterator[bytes]:
        yield canned

    for engine in rt.engines.values():
        engine.stream_raw = stream_raw  # type: ignore[attr-defined,method-assign]

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def one() -> None:
        status: list[int] = []

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(dict(SCOPE), receive, send)
        if status != [200]:
            raise RuntimeError(f"request failed: HTTP {status}")

    await rt.start()
    for inst in rt.router._instances.values():  # the engines at ports 9... are never reached: keep them up
        inst.healthy = True
    writer = getattr(rt, "ledger_writer", None) or getattr(rt, "writer", None)
    try:
        for _ in range(500):  # warm-up
            await one()
        out = []
        for _ in range(reps):
            t0, th0 = time.process_time(), time.thread_time()
            threads0, kids0, switches0 = _threads_cpu_s(), _children_cpu_s(), _loop_switches()
            records0 = _pid_cpu_s(getattr(writer, "pid", None))
            batches0 = getattr(writer, "batches", 0)
            await _in_flight(one, requests, concurrency)
            threads1, kids1 = _threads_cpu_s(), _children_cpu_s()
            records1 = _pid_cpu_s(getattr(writer, "pid", None))
            rep: dict[str, Any] = {
                "loop_thread_us_per_req": (time.thread_time() - th0) / requests * 1e6,
                "process_us_per_req": (time.process_time() - t0) / requests * 1e6,
                "ledger_process_us_per_req": (kids1 - kids0) / requests * 1e6,
                # of which the worker writing turns and pins (the rest: the energy jobs' worker)
                "ledger_records_process_us_per_req": (records1 - records0) / requests * 1e6,
                "loop_switches_per_req": (_loop_switches() - switches0) / requests,
                "commits_per_req": (getattr(writer, "batches", 0) - batches0) / requests,
            }
            for name, cpu in threads1.items():
                if name != "loop":
                    rep[f"thread_{name}_us_per_req"] = (cpu - threads0.get(name, 0.0)) / requests * 1e6
            out.append(rep)
    finally:
        await rt.stop()
    keys = sorted({k for r in out for k in r}, key=lambda k: (k.startswith("thread_"), k))
    return {
        "reps": out,
        "median": {k: statistics.median(r.get(k, 0.0) for r in out) for k in keys},
    }


async def _in_flight(one: Any, requests: int, concurrency: int) -> None:
    """`requests` calls of `one`, `concurrency` at a time (closed loop)."""
    if concurrency <= 1:
        for _ in range(requests):
            await one()
        return
    left = requests

    async def loop() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    await asyncio.gather(*(loop() for _ in range(concurrency)))


_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _stat_cpu_s(path: Path) -> float:
    """User + system CPU seconds from a /proc .../stat file (fields 14 and 15)."""
    fields = path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def _threads_cpu_s() -> dict[str, float]:
    """CPU seconds of this process's threads by name (threads of one name summed; "loop": this thread)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    names[threading.get_native_id()] = "loop"
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            cpu = _stat_cpu_s(task / "stat")
            comm = (task / "comm").read_text().strip()
        except OSError:  # the thread ended
            continue
        name = names.get(int(task.name), comm)
        name = name.rstrip("0123456789_-") or name  # pool threads numbered per start: one name
        out[name] = out.get(name, 0.0) + cpu
    return out


def _pid_cpu_s(pid: int | None) -> float:
    """CPU seconds of process `pid` (0.0 for None or a process gone)."""
    if pid is None:
        return 0.0
    try:
        return _stat_cpu_s(Path(f"/proc/{pid}/stat"))
    except OSError:
        return 0.0


def _children_cpu_s() -> float:
    """CPU seconds of this process's live children (the ledger writer's worker processes)."""
    total = 0.0
    for task in Path("/proc/self/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in kids:
            try:
                total += _stat_cpu_s(Path(f"/proc/{pid}/stat"))
            except OSError:
                continue
    return total


def _loop_switches() -> int:
    """Voluntary context switches of this (the event loop's) thread so far."""
    for line in Path("/proc/thread-self/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000, help="requests per repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--engines", type=int, default=1, help="colocated engines in the fleet")
    ap.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--tree",
        type=Path,
        default=REPO,
        help="the checkout whose code is measured (default: this script's; e.g. a worktree of the commit "
        "before a change)",
    )
    args = ap.parse_args()
    if not (args.tree / "orchestrator").is_dir():
        ap.error(f"--tree: {args.tree} has no orchestrator/ package; pass the root of a ConServe checkout")
    sys.path.insert(0, str(args.tree.resolve()))
    with tempfile.TemporaryDirectory(prefix="bench-inproc-") as d:
        res = asyncio.run(_run(args.requests, args.reps, Path(d), args.engines, args.concurrency))
    import provenance  # benchmarks/provenance.py: this script's directory is on sys.path

    res["commit"], res["machine"] = provenance.commit(args.tree), provenance.machine()
    if args.json:
        print(json.dumps(res, indent=2))
        return
    m = res["median"]
    print(
        f"commit {res['commit']}, {res['machine']}; {args.engines} engine(s); "
        f"{args.concurrency} in flight; median of {args.reps} x {args.requests} requests"
    )
    print(f"event-loop thread CPU per request: {m['loop_thread_us_per_req']:.1f} us")
    print(f"process CPU per request (+ ledger writer and energy threads): {m['process_us_per_req']:.1f} us")
    print(
        f"ledger writer processes CPU per request: {m['ledger_process_us_per_req']:.1f} us (turns and pins "
        f"{m['ledger_records_process_us_per_req']:.1f}, the rest energy jobs)"
    )
    print(
        f"event-loop voluntary context switches per request: {m['loop_switches_per_req']:.2f}; "
        f"ledger commits per request: {m['commits_per_req']:.2f}"
    )
    others = {k[7:-11]: v for k, v in m.items() if k.startswith("thread_")}
    print("other threads, CPU us per request: " + ", ".join(f"{k} {v:.1f}" for k, v in others.items()))


if __name__ == "__main__":
    main()
