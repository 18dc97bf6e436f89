"""What the simulated engines (orchestrator/engines/sim.py) answer: synthetic text that says it is simulated,
a tool call when the request offers tools, the output length a request asks for, the streamed chunks and the
non-streaming body assembled from them.

Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from orchestrator.engines.base import EngineRequest, RequestKind

__all__ = [
    "DEFAULT_NATURAL_OUTPUT_TOKENS",
    "SIM_TEXT_PREFIX",
    "collect_completion",
    "natural_output",
    "openai_chunks",
    "requested_max",
    "tool_to_call",
]

SIM_TEXT_PREFIX = "[simulated]"

# Output length of a turn that the client does not cap: the paper's SWE-bench trace decodes ~120 tokens per
# turn (DESIGN.md section 1; trace_profile_summary.csv).
DEFAULT_NATURAL_OUTPUT_TOKENS = 120


def natural_output(body: dict[str, Any], natural: int) -> int:
    """Where the simulated model would stop by itself: the engine's natural length, or later when the client
    asks for at least ``min_tokens`` (vLLM's sampling parameter: no end of sequence before that many)."""
    lo = body.get("min_tokens")
    if isinstance(lo, int) and not isinstance(lo, bool) and lo > natural:
        return lo
    return natural


def requested_max(body: dict[str, Any], natural: int) -> int:
    """Output tokens this turn decodes: the client's cap, or the model's natural length (see
    :func:`natural_output`)."""
    natural = natural_output(body, natural)
    cap = body.get("max_completion_tokens")
    if cap is None:
        cap = body.get("max_tokens")
    if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1:
        return min(cap, natural)
    return natural


def tool_to_call(body: dict[str, Any]) -> str | None:
    """Name of the tool the simulated model calls, or None (no tools offered, or tool_choice 'none')."""
    tools = body.get("tools")
    if not tools or body.get("tool_choice") == "none":
        return None
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name")
        if isinstance(name, str):
            return name
    first = tools[0] if isinstance(tools, list) else None
    if isinstance(first, dict):
        name = first.get("function", {}).get("name")
        if isinstance(name, str):
            return name
    return "tool"


async def openai_chunks(
    req: EngineRequest,
    model_name: str,
    natural_output_tokens: int,
    tokens: AsyncIterator[int],
    usage: Callable[[int], dict[str, Any]],
) -> AsyncIterator[dict[str, Any]]:
    """The OpenAI streaming chunks of a request whose tokens come from ``tokens``: synthetic text (or a tool
    call's arguments), then the finish reason, then ``usage(tokens emitted)``."""
    chat = req.kind is RequestKind.CHAT
    rid = ("chatcmpl-" if chat else "cmpl-") + req.request_id
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    tool = tool_to_call(req.body) if chat else None
    max_out = requested_max(req.body, natural_output_tokens)

    def chunk(delta_or_text: Any, finish: str | None = None) -> dict[str, Any]:
        ch: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            ch["delta"] = delta_or_text
        else:
            ch["text"] = delta_or_text
        return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [ch]}

    n = 0
    call_id = f"call_{req.request_id}"
    async for _ in tokens:
        n += 1
        if tool is not None:
            piece = ('{"note": "' + SIM_TEXT_PREFIX) if n == 1 else " token"
            if n == max_out:
                piece += '"}'
            tc: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
            if n == 1:
                tc.update(id=call_id, type="function")
                tc["function"]["name"] = tool
            delta: Any = {"tool_calls": [tc]}
        else:
            text = SIM_TEXT_PREFIX if n == 1 else " token"
            delta = {"content": text} if chat else text
        if chat and n == 1:
            delta = {"role": "assistant", **delta}
        yield chunk(delta)
    if tool is not None:
        finish = "tool_calls"
    else:
        natural = natural_output(req.body, natural_output_tokens)
        finish = "length" if max_out < natural else "stop"
    yield chunk({} if chat else "", finish)
    last = chunk({} if chat else "")
    yield last | {"choices": [], "usage": usage(n)}


async def collect_completion(
    chunks: AsyncIterator[dict[str, Any]], kind: RequestKind, model_name: str
) -> dict[str, Any]:
    """The non-streaming OpenAI body of a request, from its streamed chunks."""
    parts: list[str] = []
    tool_args: list[str] = []
    tool_head: dict[str, Any] | None = None
    finish: str | None = None
    usage: dict[str, Any] | None = None
    rid = created = None
    async for chunk in chunks:
        rid, created = chunk["id"], chunk["created"]
        if chunk.get("usage"):
            usage = chunk["usage"]
        for ch in chunk["choices"]:
            finish = ch.get("finish_reason") or finish
            if kind is RequestKind.COMPLETION:
                parts.append(ch.get("text", ""))
                continue
            delta = ch.get("delta", {})
            parts.append(delta.get("content") or "")
            for tc in delta.get("tool_calls") or ():
                if "id" in tc:
                    tool_head = {"id": tc["id"], "type": "function", "name": tc["function"]["name"]}
                tool_args.append(tc["function"].get("arguments", ""))
    text = "".join(parts)
    if kind is RequestKind.COMPLETION:
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    else:
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if tool_head is not None:
            message["tool_calls"] = [
                {
                    "id": tool_head["id"],
                    "type": "function",
                    "function": {"name": tool_head["name"], "arguments": "".join(tool_args)},
                }
            ]
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model_name,
        "choices": [choice],
        "usage": usage,
    }
