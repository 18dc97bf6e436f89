"""The router's values and edges: its config, one client turn, its errors, the sink, observer and pin lookup
it writes to and reads from, and the tokenizer-free prompt estimate.

Pure: no I/O, no clock. Must not import fastapi, starlette or sqlalchemy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from conserve.errors import ConServeError
from energy.records import ConversationView, PinRecord, TurnRecord
from orchestrator.engines.base import RequestKind

# Tokenizer-free estimate: ~4 characters per token for English text with BPE tokenizers (OpenAI's rule of
# thumb, "What are tokens and how to count them"), plus per-message chat-template overhead (~4 tokens:
# role markers and separators, same source).
CHARS_PER_TOKEN = 4
CHAT_MESSAGE_OVERHEAD_TOKENS = 4


# ---- errors the API maps to answers ------------------------------------------------------------------


class EngineUnavailable(ConServeError):
    """No healthy engine could serve the turn (API: 503)."""


class EngineRejected(ConServeError):
    """The engine refused the request as invalid (HTTP 4xx); the engine is healthy (API: same status)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class PromptTooLarge(ConServeError):
    """The turn cannot fit in the KV cache of any instance (API: 400 naming the limit)."""

    def __init__(self, message: str, limit_tokens: int) -> None:
        super().__init__(message)
        self.limit_tokens = limit_tokens


class ConversationNotFound(ConServeError):
    """Unknown conversation id (API: 404)."""


# ---- edges the router writes to -----------------------------------------------------------------------


class TurnSink(Protocol):
    """Where turns and pins go (the ledger). Both calls must return immediately (queue, not SQL)."""

    def turn(self, rec: TurnRecord) -> None: ...

    def pin(self, rec: PinRecord) -> None: ...


class PinLookup(Protocol):
    """Shared pins (several router replicas on one PostgreSQL ledger): read a conversation's history."""

    async def lookup(self, conversation_id: str) -> ConversationView | None: ...


class RouterObserver(Protocol):
    """Metrics hooks (the API implements them in api/metrics.py, exposed in Prometheus format)."""

    def turn_done(
        self, rec: TurnRecord, ttft_s: float | None, tbt_gaps_s: list[float], ttfet_s: float | None
    ) -> None: ...

    def kv_transfer(self, prefill_instance: str, decode_instance: str, nbytes: int) -> None: ...

    def replaced(self, conversation_id: str, old_instance: str | None, new_instance: str) -> None: ...

    def retried(self, instance_id: str) -> None: ...

    def forgotten(self, conversation_id: str) -> None:
        """The conversation left the router's memory (ended, idle past its TTL, or one-turn and done)."""


class NullSink:
    def turn(self, rec: TurnRecord) -> None:
        return None

    def pin(self, rec: PinRecord) -> None:
        return None


class NullObserver:
    def turn_done(
        self, rec: TurnRecord, ttft_s: float | None, tbt_gaps_s: list[float], ttfet_s: float | None
    ) -> None:
        return None

    def kv_transfer(self, prefill_instance: str, decode_instance: str, nbytes: int) -> None:
        return None

    def replaced(self, conversation_id: str, old_instance: str | None, new_instance: str) -> None:
        return None

    def retried(self, instance_id: str) -> None:
        return None

    def forgotten(self, conversation_id: str) -> None:
        return None


# ---- values -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouterConfig:
    model_name: str
    max_context_tokens: int
    pin_ttl_s: float = 900.0  # an idle conversation keeps its pin this long (tool gaps: seconds to minutes)
    observe_timeout_s: float = 5.0
    max_attempts: int = 2  # first try + one retry on another instance
    # A health poll that fails once is not a dead engine (a /metrics answer slowed by load, a keep-alive
    # connection the server closes as it is reused): the engine is marked down after this many consecutive
    # failed polls, or at once when a request cannot reach it (orchestrator.router.failures).
    down_after_failed_polls: int = 3
    run_id: str = "live"  # the ledger run this router records into (unique per serve start)
    # A conversation the client ended stays in memory this long (then only in the ledger): a turn sent with
    # its id meanwhile continues its numbering, and GET /v1/conversations reads it while the ledger writer
    # catches up (it ships every 0.25 s; runtime.ServeSettings.ledger_flush_interval_s). Memory is released
    # after this, not after pin_ttl_s (the issue-13 finding: ~3 KB per ended conversation for 900 s).
    ended_keep_s: float = 30.0
    # Router-side KV admission (the rule per policy: orchestrator.core.admission, as the simulator's
    # --router-admission): a turn the rule reserves for waits until a healthy decode-capable instance shows
    # room for its reservation in the fleet view, re-checking every admission_poll_s, at most
    # admission_wait_s (then it is placed anyway: bounded). Live, only the turns so far are known: the
    # reservation is the current prompt + the client's output cap. 0: off (the default; no await added).
    admission_wait_s: float = 0.0
    admission_poll_s: float = 0.05


@dataclass(frozen=True, slots=True)
class TurnInput:
    """One client request, already validated by the API."""

    kind: RequestKind
    body: dict[str, Any]  # OpenAI body as the engine should see it (conserve fields removed)
    conversation_id: str | None  # None: a one-turn conversation
    client_final: bool = False
    include_usage: bool = False  # the client asked for stream_options.include_usage
    prompt_tokens: int | None = None  # precomputed estimate; None: the router estimates
    one_turn: bool = False  # conversation_id was made up for a request that named none (a one-turn one)


def estimate_prompt_tokens(kind: RequestKind, body: Mapping[str, Any]) -> int:
    """Tokenizer-free prompt length estimate (see CHARS_PER_TOKEN)."""
    if kind is RequestKind.COMPLETION:
        prompt = body.get("prompt", "")
        if isinstance(prompt, str):
            return max(1, -(-len(prompt) // CHARS_PER_TOKEN))
        if isinstance(prompt, list) and prompt:
            first = prompt[0]
            if isinstance(first, int):
                return len(prompt)  # already token ids
            if isinstance(first, str):
                return max(1, -(-len(first) // CHARS_PER_TOKEN))
            if isinstance(first, list):
                return max(1, len(first))
        return 1
    chars = 0
    messages = body.get("messages") or ()
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    chars += len(part["text"])
        if isinstance(m, dict):
            for tc in m.get("tool_calls") or ():
                fn = tc.get("function", {}) if isinstance(tc, dict) else {}
                chars += len(str(fn.get("name", ""))) + len(str(fn.get("arguments", "")))
    tools = body.get("tools")
    if tools:
        chars += len(repr(tools))
    return max(1, -(-chars // CHARS_PER_TOKEN) + CHAT_MESSAGE_OVERHEAD_TOKENS * len(messages))


def max_output(body: Mapping[str, Any]) -> int | None:
    """The client's output cap (max_completion_tokens, else max_tokens), None when it set none."""
    cap = body.get("max_completion_tokens")
    if cap is None:
        cap = body.get("max_tokens")
    return cap if isinstance(cap, int) and not isinstance(cap, bool) else None


def has_history(inp: TurnInput) -> bool:
    """The request carries earlier turns (a chat with assistant/tool messages; any completion prompt)."""
    if inp.kind is RequestKind.CHAT:
        return any(
            isinstance(m, dict) and m.get("role") in ("assistant", "tool")
            for m in inp.body.get("messages") or ()
        )
    return True
