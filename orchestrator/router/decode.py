"""The decode step: stream one attempt of a turn from its decoder, time and count it, and yield typed events.

Reads the engine's native stream (``Engine.wire``: chunk dicts, or SSE bytes split and parsed here one event
at a time), and per chunk: times the first token and every gap after it, counts tokens, keeps the finish
reason, tool calls and the engine's ``usage`` on the :class:`Attempt`, and raises
:class:`~orchestrator.router.failures.EngineAnsweredError` on an error event. What the client gets leaves as
:class:`Output` events, encoded by the output adapter (orchestrator.router.adapters): one per engine read,
except that with ``adapter.split_first`` the first token's event ends its own Output, which leaves before the
rest of that read is parsed.

The decoder's in-flight accounting (requests, and the prompt tokens it prefills locally until the first
token) is held for exactly as long as the stream is open.

Must not import fastapi, starlette or sqlalchemy.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from conserve.clock import Clock
from orchestrator.engines.base import EngineRequest, Wire
from orchestrator.engines.sse import SseSplitter, parse_event
from orchestrator.router.adapters import OutputAdapter
from orchestrator.router.failures import EngineAnsweredError
from orchestrator.router.instances import Instance
from placement.base import Placement


@dataclass(slots=True)
class Attempt:
    """Timings and results of one attempt of a turn on one decoder."""

    request_id: str
    placement: Placement
    first_s: float | None = None
    last_s: float | None = None
    tokens: int = 0
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    tool_calls: bool = False
    gaps_s: list[float] = field(default_factory=list)
    sent: bool = False  # something reached the client
    prefill_cached_tokens: int = 0  # the remote prefiller's prefix-cache hit (PrefillResult.cached_tokens)


@dataclass(slots=True)
class Output:
    """An event of the decode stream: client-bound items, as the output adapter encoded them."""

    items: list[Any]
    first_token: bool  # ends at the turn's first token (split off its read: it leaves at once)
    last: bool  # from the engine's last read (its ``[DONE]`` was in it; known for SSE engines only)


# One engine read: (chunk dict, None) items from a CHUNKS engine, (JSON payload, event bytes) from an SSE one.
_Read = Sequence[tuple[Any, bytes | None]]


async def engine_reads(engine: Any, req: EngineRequest) -> AsyncGenerator[tuple[_Read, bool], None]:
    """(read, last): one per read from the engine's native stream; `last` is True when the engine's
    ``[DONE]`` was in this read (known for SSE engines only)."""
    if engine.wire is Wire.CHUNKS:
        async with contextlib.aclosing(engine.stream(req)) as chunks:
            async for ch in chunks:
                yield [(ch, None)], False
        return
    parser = SseSplitter()
    async with contextlib.aclosing(engine.stream_raw(req)) as blocks:
        async for block in blocks:
            events = parser.split(block)
            if parser.done:
                yield events, True
                return
            if events:
                yield events, False
    yield parser.close(), True


async def decode_stream(
    dec: Instance,
    req: EngineRequest,
    att: Attempt,
    adapter: OutputAdapter,
    clock: Clock,
    local_prefill_tokens: int,
) -> AsyncGenerator[Output, None]:
    """The attempt's Output events (see the module docstring); `att` is filled in as chunks arrive and
    ``att.last_s`` is set when the engine's stream ended."""
    keep_usage, split_first, passthrough = adapter.keep_usage, adapter.split_first, adapter.passthrough
    encode = adapter.encode
    local_prefill = local_prefill_tokens
    dec.inflight_prefill_tokens += local_prefill
    dec.inflight_requests += 1
    try:
        async with contextlib.aclosing(engine_reads(dec.engine, req)) as reads:
            prev_s = 0.0
            async for batch, last in reads:
                now = clock.now_s()
                out: list[Any] = []
                for item, raw in batch:
                    ch = item if raw is None else parse_event(item, dec.instance_id)
                    first_token = False
                    choices = ch.get("choices")
                    if choices:
                        c0 = choices[0]
                        if c0.get("finish_reason"):
                            att.finish_reason = c0["finish_reason"]
                        delta = c0.get("delta")
                        if delta is None:
                            produced = c0.get("text")
                        else:
                            produced = (
                                delta.get("content")
                                or delta.get("tool_calls")
                                or delta.get("reasoning_content")
                            )
                        if produced:
                            if att.first_s is None:
                                att.first_s = now
                                dec.inflight_prefill_tokens -= local_prefill
                                local_prefill = 0
                                first_token = True
                            else:
                                att.gaps_s.append(now - prev_s)
                            prev_s = now
                            att.tokens += 1
                            if delta is not None and delta.get("tool_calls"):
                                att.tool_calls = True
                    elif "error" in ch:
                        err = ch["error"]
                        msg = err.get("message", err) if isinstance(err, dict) else err
                        raise EngineAnsweredError(f"engine {dec.instance_id!r} failed mid-stream: {msg}")
                    usage = ch.get("usage")
                    if usage:
                        att.usage = usage
                        if not choices and not keep_usage:
                            continue
                    out.append(raw if raw is not None and passthrough else encode(ch))
                    if first_token and split_first:
                        # the first token leaves now, before the rest of this read is parsed and (if it was
                        # the engine's last read) the turn recorded
                        yield Output(out, True, False)
                        out = []
                if out:
                    yield Output(out, False, last)
        att.last_s = clock.now_s()
    finally:
        dec.inflight_prefill_tokens -= local_prefill
        dec.inflight_requests -= 1
