"""The SSE body (api/routes_openai.py sse_body) closes what it iterates when its consumer stops at [DONE]:
no async generator is left for the event loop's finalizer (a thread-safe wake-up and a task per response,
benchmarks/bench_router_inproc.py)."""

from __future__ import annotations

import gc
import sys
from collections.abc import AsyncIterator
from typing import Any

from api.routes_openai import sse_body
from orchestrator.engines.sse import SSE_DONE


async def _router_blocks() -> AsyncIterator[bytes]:
    yield b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\n' + SSE_DONE


async def test_a_response_stopped_at_done_leaves_no_generator_to_the_finalizer() -> None:
    finalized: list[str] = []
    hooks = sys.get_asyncgen_hooks()

    def finalizer(agen: Any) -> None:
        finalized.append(agen.ag_code.co_name)
        if hooks.finalizer is not None:
            hooks.finalizer(agen)

    sys.set_asyncgen_hooks(firstiter=hooks.firstiter, finalizer=finalizer)
    try:
        body = sse_body(b'data: {"choices":[{"delta":{"content":"hel"}}]}\n\n', _router_blocks())
        blocks = []
        async for block in body:  # as api/fastpath.py _stream: stop at the block ending with [DONE], close
            blocks.append(block)
            if block.endswith(SSE_DONE):
                break
        await body.aclose()
        del body
        gc.collect()
    finally:
        sys.set_asyncgen_hooks(*hooks)
    assert len(blocks) == 2 and blocks[-1].endswith(SSE_DONE)
    assert finalized == []
