"""The Engine interface: one seam, two implementations (vLLM over HTTP; a simulated engine in wall time).

The router talks to engines only through this Protocol. Bodies are OpenAI-compatible dicts, forwarded as
received (plus the fields the router must set); engines return OpenAI-compatible dicts, so the API layer
can pass them through unchanged.

Capabilities are declared, never probed: every engine says which of its two streams is native
(:attr:`Engine.wire`: OpenAI chunk dicts from an in-process engine, or the OpenAI SSE bytes of an HTTP
engine, which the router forwards without re-encoding) and implements both (the other one converts, with
:mod:`orchestrator.engines.sse`); every engine answers :meth:`Engine.observe_shared` (one scrape shared
by the router's health poll and the energy tick where a scrape is costly, :meth:`Engine.observe` otherwise)
and states its KV capacity (0 where it is learned from the engine's observations). An idle conversation's KV
can be released (:meth:`Engine.release_kv`, applied by the KV-gap keeper, orchestrator/kv_gaps_live.py):
dropped by every engine, offloaded to host memory by those that declare :attr:`Engine.kv_offload`; the
conversation's next request is then served by a restore from host memory or a re-prefill.

THIS IS THE CONTRACT the router (api/, orchestrator/router/) and the engine implementations
(orchestrator/engines/vllm.py, orchestrator/engines/sim.py) code against; keep it stable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from placement.base import Role
from placement.kv_gaps import GapAction

# What the router sends a prefiller for a disaggregated turn 1 (vLLM KV-connector protocol, DESIGN.md s7).
REMOTE_DECODE_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


class Wire(StrEnum):
    """Which stream an engine produces natively (the router reads that one)."""

    CHUNKS = "chunks"  # Engine.stream: OpenAI chunk dicts (in-process engines)
    SSE = "sse"  # Engine.stream_raw: the engine's OpenAI SSE bytes as they arrive (HTTP engines)


class RequestKind(StrEnum):
    CHAT = "chat"  # /v1/chat/completions
    COMPLETION = "completion"  # /v1/completions


@dataclass(frozen=True, slots=True)
class EngineRequest:
    kind: RequestKind
    body: dict[str, Any]  # OpenAI request body; engines must not mutate it (copy before changing)
    request_id: str
    conversation_id: str
    prompt_tokens: int = 0  # the router's count of the prompt (for accounting and simulated engines)
    kv_transfer_params: dict[str, Any] | None = None  # from a prefiller, forwarded to the decoder
    # a KV round trip (placement.base.Placement.history_tokens, orchestrator.core.turns): a prefill request
    # whose first `history_tokens` prompt tokens' KV the prefiller pulls from `history_source` (the decoder
    # holding them) instead of computing them. Simulated engines honour it; vLLM's KV connectors have no
    # decoder -> prefiller pull, so a vLLM prefiller computes the whole prompt (its prefix cache may hit).
    history_tokens: int = 0
    history_source: str | None = None


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """What a prefiller returns for a remote-decode request."""

    kv_transfer_params: dict[str, Any] | None
    prompt_tokens: int
    transferred_bytes: int = 0
    cached_tokens: int = 0  # prompt tokens the prefiller found in its prefix cache (it computed the rest)


@dataclass(frozen=True, slots=True)
class EngineObservation:
    """Observables scraped from an engine (vLLM /metrics names in comments)."""

    healthy: bool
    kv_usage_frac: float = 0.0  # vllm:kv_cache_usage_perc (0..1)
    kv_capacity_tokens: int = 0
    running: int = 0  # vllm:num_requests_running
    waiting: int = 0  # vllm:num_requests_waiting
    prefix_cache_hits_tokens: float = 0.0  # vllm:prefix_cache_hits_total (counter)
    prefix_cache_queries_tokens: float = 0.0  # vllm:prefix_cache_queries_total (counter)
    kv_transfer_bytes: float = 0.0  # vllm:nixl_bytes_transferred (counter), 0 where absent
    extra: dict[str, float] = field(default_factory=dict)
    error: str = ""  # why the engine is reported unhealthy (empty when healthy)


@dataclass(frozen=True, slots=True)
class KvReleased:
    """What :meth:`Engine.release_kv` did with an idle conversation's KV."""

    conversation_id: str
    action: GapAction  # OFFLOAD (to host memory; restored on its next request) or DROP (re-prefilled)
    detail: str = ""  # how the engine did it (e.g. vLLM: the cache salt it now sends for the conversation)


@runtime_checkable
class Engine(Protocol):
    instance_id: str
    role: Role
    tier: str
    wire: Wire  # the native stream: the router reads stream() for CHUNKS, stream_raw() for SSE
    kv_capacity_tokens: int  # KV cache size in tokens; 0: not known until observe() reports it
    kv_offload: bool  # release_kv(.., GapAction.OFFLOAD) works: a host-memory KV tier it restores from

    async def prefill(self, req: EngineRequest) -> PrefillResult:
        """Prefill only (max_tokens 1, do_remote_decode) and return the KV handle for the decoder."""
        ...

    async def complete(self, req: EngineRequest) -> dict[str, Any]:
        """Non-streaming: the whole OpenAI response body (with `usage`)."""
        ...

    def stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        """Streaming: OpenAI chunk dicts; the last one carries `usage` (stream_options.include_usage)."""
        ...

    def stream_raw(self, req: EngineRequest) -> AsyncIterator[bytes]:
        """Streaming as OpenAI SSE bytes (``data: {chunk}\\n\\n`` events, ``data: [DONE]`` last), in blocks of
        any size; the usage chunk is requested as for :meth:`stream`."""
        ...

    async def observe(self) -> EngineObservation: ...

    async def observe_shared(self) -> EngineObservation:
        """:meth:`observe`, possibly answered by a scrape already in flight or made a moment ago (the router's
        health poll and the energy tick observe every engine in the same scheduler tick)."""
        ...

    async def release_kv(self, conversation_id: str, action: GapAction) -> KvReleased:
        """Release the KV this engine keeps for an idle conversation (no request of it running): DROP frees
        it (its next request re-prefills the whole context), OFFLOAD moves it to host memory (its next request
        restores it from there; EngineError where ``kv_offload`` is false). KEEP: ValueError."""
        ...

    async def aclose(self) -> None: ...
