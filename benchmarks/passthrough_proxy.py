"""The floor for the router-overhead benchmark: the thinnest Python proxy we could write, nothing else.

uvicorn (uvloop + httptools, as `orchestrator serve` runs) plus the router's HTTP/1.1 engine client
(orchestrator/engines/http1.py): read the body, POST it to the engine, relay the response bytes. No parsing,
placement, accounting, ledger or metrics. benchmarks/bench_router.py measures it next to the router, so
the report can say how much of the added latency any Python proxy on this machine pays, and how much is
ConServe's own work. For the benchmark ONLY.

    python benchmarks/passthrough_proxy.py --port 8200 --engine-port 8100
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

from orchestrator.engines.http1 import Http1Pool


def make_app(engine_port: int) -> Any:
    pool = Http1Pool("127.0.0.1", engine_port)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        async with await pool.post(
            scope["path"], b"".join(chunks), {"Content-Type": "application/json"}
        ) as r:
            ctype = dict(r.headers).get(b"content-type", b"application/json")
            await send(
                {"type": "http.response.start", "status": r.status, "headers": [(b"content-type", ctype)]}
            )
            async for block in r.iter_blocks():
                await send({"type": "http.response.body", "body": block, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8200)
    ap.add_argument("--engine-port", type=int, default=8100)
    args = ap.parse_args()
    uvicorn.run(
        make_app(args.engine_port), host="127.0.0.1", port=args.port, log_level="warning", loop="uvloop",
        http="httptools",
    )  # fmt: skip


if __name__ == "__main__":
    main()
