"""The router's own CPU per request, in process: the ASGI app (fast path, router, metrics, ledger hand-off)
driven directly, with an engine whose stream is the stub engine's canned bytes. No sockets, no HTTP server,
no load generator: what is left is the Python work ConServe adds per request, so code changes can be
compared with far less noise than benchmarks/bench_router.py (whose figures include uvicorn, the kernel and
CPU sharing).

    python benchmarks/bench_router_inproc.py [--requests 20000] [--reps 3] [--engines 1] [--json]

``--engines N`` puts N colocated engines in the fleet (all answering with the same canned bytes): placement
then looks at N instances per request, as a router in front of a real fleet does.

Reports the event-loop thread's CPU per request (time.thread_time) and the whole process's
(time.process_time: adds the ledger shipper and energy accounting threads; the ledger writer child process
is not included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
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


async def _run(requests: int, reps: int, tmp: Path, engines: int = 1) -> dict[str, Any]:
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
        engine.stream_raw = stream_raw  # type: ignore[attr-defined]

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
    try:
        for _ in range(500):  # warm-up
            await one()
        out = []
        for _ in range(reps):
            t0, th0 = time.process_time(), time.thread_time()
            for _ in range(requests):
                await one()
            out.append(
                {
                    "loop_thread_us_per_req": (time.thread_time() - th0) / requests * 1e6,
                    "process_us_per_req": (time.process_time() - t0) / requests * 1e6,
                }
            )
    finally:
        await rt.stop()
    return {
        "reps": out,
        "median": {k: statistics.median(r[k] for r in out) for k in out[0]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000, help="requests per repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--engines", type=int, default=1, help="colocated engines in the fleet")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-inproc-") as d:
        res = asyncio.run(_run(args.requests, args.reps, Path(d), args.engines))
    import provenance  # benchmarks/provenance.py: this script's directory is on sys.path

    res["commit"], res["machine"] = provenance.commit(), provenance.machine()
    if args.json:
        print(json.dumps(res, indent=2))
        return
    m = res["median"]
    print(
        f"commit {res['commit']}, {res['machine']}; {args.engines} engine(s); "
        f"median of {args.reps} x {args.requests} requests"
    )
    print(f"event-loop thread CPU per request: {m['loop_thread_us_per_req']:.1f} us")
    print(f"process CPU per request (+ shipper and energy threads): {m['process_us_per_req']:.1f} us")


if __name__ == "__main__":
    main()
