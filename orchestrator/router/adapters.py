"""Output adapters: how a turn's decode events reach the client, in each of the router's three output modes.

- :class:`SseOutput`   SSE bytes (``Router.stream_sse``, the API's streaming path): an SSE engine's events
                       are forwarded byte for byte (parsed once for accounting, never re-encoded), a chunk
                       engine's are encoded here; one block per engine read, the first token's block split
                       off to leave at once; the engine's last read waits until the turn is recorded and
                       leaves with ``data: [DONE]``.
- :class:`ChunkOutput` chunk dicts (``Router.stream``): each read's chunks as soon as they are parsed.
- :class:`JsonOutput`  one OpenAI response body (``Router.complete``): every chunk held until the turn is
                       recorded, then folded by :func:`assemble_response`.

Usage-only chunks (no choices) reach a streaming client only when it asked for them
(``stream_options.include_usage``); the JSON body always carries usage.

Pure: no I/O. Must not import fastapi, starlette or sqlalchemy.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.engines.base import RequestKind
from orchestrator.engines.sse import SSE_DONE, encode_event

if TYPE_CHECKING:
    from orchestrator.router.decode import Output


class OutputAdapter(Protocol):
    keep_usage: bool  # usage-only chunks go to the client
    split_first: bool  # the first token's event ends its own Output (it leaves before the rest of its read)
    passthrough: bool  # an SSE engine's event bytes are the item (not encode(chunk))

    def encode(self, chunk: dict[str, Any]) -> Any:
        """The item the client gets for one chunk."""
        ...

    def holds(self, out: Output) -> bool:
        """This Output waits until the turn is recorded (then :meth:`close` sends it)."""
        ...

    def block(self, items: list[Any]) -> Any:
        """What leaves at once for an Output that is not held."""
        ...

    def close(self, held: list[Any]) -> Any | None:
        """What leaves once the turn is recorded (its held items); None: nothing."""
        ...


class SseOutput:
    __slots__ = ("keep_usage",)
    split_first = True
    passthrough = True

    def __init__(self, include_usage: bool) -> None:
        self.keep_usage = include_usage

    @staticmethod
    def encode(chunk: dict[str, Any]) -> bytes:
        return encode_event(chunk)

    @staticmethod
    def holds(out: Output) -> bool:
        return out.last  # the engine's last read leaves after the turn is recorded, with [DONE]

    @staticmethod
    def block(items: list[bytes]) -> bytes:
        return items[0] if len(items) == 1 else b"".join(items)

    @staticmethod
    def close(held: list[bytes]) -> bytes:
        held.append(SSE_DONE)
        return b"".join(held)


class ChunkOutput:
    __slots__ = ("keep_usage",)
    split_first = False
    passthrough = False

    def __init__(self, include_usage: bool) -> None:
        self.keep_usage = include_usage

    @staticmethod
    def encode(chunk: dict[str, Any]) -> dict[str, Any]:
        return chunk

    @staticmethod
    def holds(out: Output) -> bool:
        return False

    @staticmethod
    def block(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return items

    @staticmethod
    def close(held: list[dict[str, Any]]) -> None:
        return None


class JsonOutput:
    __slots__ = ("kind", "model")
    keep_usage = True
    split_first = False
    passthrough = False

    def __init__(self, kind: RequestKind, model: str) -> None:
        self.kind, self.model = kind, model

    @staticmethod
    def encode(chunk: dict[str, Any]) -> dict[str, Any]:
        return chunk

    @staticmethod
    def holds(out: Output) -> bool:
        return True

    @staticmethod
    def block(items: list[dict[str, Any]]) -> list[dict[str, Any]]:  # pragma: no cover - everything is held
        return items

    def close(self, held: list[dict[str, Any]]) -> dict[str, Any]:
        return assemble_response(self.kind, held, self.model)


def assemble_response(kind: RequestKind, chunks: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """Fold OpenAI stream chunks into the non-streaming response body (text, tool calls, usage)."""
    text: list[str] = []
    tool_calls: dict[int, dict[str, Any]] = {}
    finish = None
    usage = None
    rid, created, model_out = None, int(time.time()), model
    for ch in chunks:
        rid = ch.get("id", rid)
        created = ch.get("created", created)
        model_out = ch.get("model", model_out)
        if ch.get("usage"):
            usage = ch["usage"]
        for c in ch.get("choices") or ():
            finish = c.get("finish_reason") or finish
            if kind is RequestKind.COMPLETION:
                text.append(c.get("text") or "")
                continue
            delta = c.get("delta") or {}
            if delta.get("content"):
                text.append(delta["content"])
            for tc in delta.get("tool_calls") or ():
                slot = tool_calls.setdefault(
                    int(tc.get("index", 0)),
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if tc.get("id"):
                    slot["id"] = tc["id"]
                fn = tc.get("function") or {}
                if fn.get("name"):
                    slot["function"]["name"] = fn["name"]
                slot["function"]["arguments"] += fn.get("arguments") or ""
    if kind is RequestKind.COMPLETION:
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model_out,
            "choices": [{"index": 0, "text": "".join(text), "finish_reason": finish, "logprobs": None}],
            "usage": usage,
        }
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text else None}
    if tool_calls:
        message["tool_calls"] = [tool_calls[i] for i in sorted(tool_calls)]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model_out,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": usage,
    }
