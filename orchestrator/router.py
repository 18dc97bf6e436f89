"""The live router: applies a placement policy to live requests, keeps pins, records every turn.

One policy, one driver core, two drivers: this module and the simulator build a
:class:`placement.base.FleetView` and call ``policy.place(turn, view)`` -- the router never decides placement
itself. Views, pins, the meaning of every Placement field and the per-conversation summary come from the
driver core (orchestrator/core/), shared with the simulator. Per turn it

1. estimates the prompt's tokens (tokenizer-free: ~4 characters per token, plus a few per chat message;
   the engine's reported ``usage`` replaces the estimate in the records once the turn ends);
2. builds a FleetView from the engines' polled observations plus its own accounting (in-flight prefill
   tokens per instance, KV tokens of the conversations pinned to each decoder: a decoder's used KV is the
   larger of what it reports and what its pinned conversations hold);
3. executes the Placement: a remote prefill calls ``prefill()`` on the prefiller and forwards the returned
   ``kv_transfer_params`` with the original request to the decoder; otherwise the decoder prefills locally
   (from its prefix cache for later turns);
4. streams the decoder's chunks back, timing the first token, every token gap and the last token;
5. records the turn (a :class:`energy.records.TurnRecord`) and pins (``PinRecord``) through a
   :class:`TurnSink` that must not block (the runtime's background SQL writer); with ``durability`` given,
   an answered turn's last byte waits until that record is committed.

Final turn: a turn whose ``finish_reason`` is ``"stop"`` with no tool calls, or that the client marks final
(``X-Conversation-Final: true`` header or body ``"conserve": {"final": true}``, parsed by the API). TTFET is
from the arrival of turn 1 to the first token of the latest final turn. The pin is held until the client
marks a turn final, the conversation is idle for ``pin_ttl_s``, or its decoder fails (a ``stop`` turn does
not end it: a chat may go on). A request without a conversation id is a one-turn conversation.

Failure: an engine that cannot be reached (refused, reset, timed out) is marked down at once; one that
answers with an error (HTTP 5xx, an error event in its stream) stays up; a health poll marks an engine down
after ``down_after_failed_polls`` failed polls in a row and brings it back on its first good poll. A failed
attempt is recorded with status ``replaced`` and retried once through the policy (which re-places a pinned
conversation on a healthy decoder with a full re-prefill) when nothing was sent to the client yet; otherwise
the turn is recorded with status ``error`` and :class:`EngineUnavailable` is raised (the API answers 503, or
an SSE error event mid-stream).

Must not import fastapi, starlette or sqlalchemy (the API and the ledger are edges).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from conserve.clock import SYSTEM_CLOCK, Clock
from conserve.errors import ConServeError
from energy.records import ConversationView, PinRecord, TurnRecord, TurnStatus
from orchestrator.core import (
    Admit,
    ConversationState,
    PinBook,
    admit,
    any_room,
    instance_view,
    local_prefill_tokens,
    moves_pin,
    pin_reason,
    refusal_message,
    remote_prefill_tokens,
    reservation_tokens,
    retry_after_s,
    round_trip_tokens,
    rule_for,
    running_turn_kv_tokens,
)
from orchestrator.engines.base import Engine, EngineObservation, EngineRequest, RequestKind
from orchestrator.errors import EngineError
from placement.base import FleetView, InstanceView, Placement, Policy, Role, TurnRequest
from placement.errors import PlacementError

try:  # orjson parses and encodes SSE chunks ~3-5x faster than json (measured on the dev box)
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover - a declared dependency
    import json

    _loads = json.loads  # type: ignore[assignment]

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


log = logging.getLogger(__name__)

__all__ = [
    "Router",
    "RouterConfig",
    "TurnInput",
    "TurnSink",
    "RouterObserver",
    "EngineUnavailable",
    "AdmissionTimedOut",
    "EngineRejected",
    "ConversationNotFound",
    "PromptTooLarge",
    "estimate_prompt_tokens",
    "assemble_response",
    "RawSseEngine",
    "SseSplitter",
    "parse_event",
    "SSE_DONE",
]

# Tokenizer-free estimate: ~4 characters per token for English text with BPE tokenizers (OpenAI's rule of
# thumb, "What are tokens and how to count them"), plus per-message chat-template overhead (~4 tokens:
# role markers and separators, same source).
CHARS_PER_TOKEN = 4
CHAT_MESSAGE_OVERHEAD_TOKENS = 4

ENGINE_FAILURES: tuple[type[BaseException], ...] = (EngineError, OSError, asyncio.TimeoutError)


class EngineAnsweredError(EngineError):
    """The engine answered, with an error event in its stream: it is alive (not marked down)."""


class EngineUnavailable(ConServeError):
    """No healthy engine could serve the turn (API: 503)."""


class AdmissionTimedOut(EngineUnavailable):
    """No decoder had room for the turn within RouterConfig.admission_wait_s (API: 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


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


class _NullSink:
    def turn(self, rec: TurnRecord) -> None:
        return None

    def pin(self, rec: PinRecord) -> None:
        return None


class _NullObserver:
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
    # failed polls, or at once when a request cannot reach it (see Router._run).
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


def _wall(clock: Clock, at_s: float | None) -> datetime | None:
    return None if at_s is None else clock.wall(at_s)


# ---- mutable state (private) --------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Instance:
    engine: Engine
    instance_id: str
    role: Role
    tier: str
    healthy: bool = True
    down_reason: str | None = None
    failed_polls: int = 0  # consecutive
    obs: EngineObservation | None = None
    kv_capacity_tokens: int = 1
    inflight_prefill_tokens: int = 0
    inflight_requests: int = 0
    pinned_tokens: int = 0
    pinned: set[str] = field(default_factory=set)
    kv_transfers_in: int = 0
    # the last view and what it was built from: every request builds the fleet view, and an unchanged instance
    # (all but one or two per request) returns its previous one. 64 instances: 270 -> 30 us per fleet view
    # (timeit), 409 -> 259 us loop CPU per request (benchmarks/bench_router_inproc.py --engines 64);
    # tests/orchestrator/test_router_views.py checks a reused view always equals a fresh one
    _view_key: tuple[Any, ...] | None = field(default=None, repr=False)
    _view: InstanceView | None = field(default=None, repr=False)

    def view(self) -> InstanceView:
        """This instance as policies see it; the same object again while nothing it is built from changed."""
        key = (
            self.obs,  # replaced, never mutated (frozen), by each poll
            self.healthy,
            self.inflight_prefill_tokens,
            self.inflight_requests,
            self.pinned_tokens,
            len(self.pinned),
            self.kv_capacity_tokens,
        )
        if key != self._view_key or self._view is None:
            self._view, self._view_key = self._build_view(), key
        return self._view

    def _build_view(self) -> InstanceView:
        obs = self.obs
        used = int(obs.kv_usage_frac * self.kv_capacity_tokens) if obs is not None else 0
        # used KV = max(resident, pinned), capped (orchestrator.core.views, as in the simulator)
        return instance_view(
            self.instance_id,
            self.role,
            self.tier,
            healthy=self.healthy,
            queued_prefill_tokens=self.inflight_prefill_tokens,
            resident_kv_tokens=used,
            pinned_kv_tokens=self.pinned_tokens,
            kv_capacity_tokens=self.kv_capacity_tokens,
            running_seqs=max(obs.running if obs is not None else 0, self.inflight_requests),
            waiting_seqs=obs.waiting if obs is not None else 0,
            pinned_conversations=len(self.pinned),
        )


@dataclass(slots=True, eq=False)
class _Conversation(ConversationState):
    """The core's conversation state (orchestrator.core.conversations) + what the router records."""

    one_turn: bool = False
    last_active_s: float = 0.0
    reopened: bool = False  # sent a turn again after the client ended it (Router._reopen)
    records: list[TurnRecord] = field(default_factory=list)
    pins: list[PinRecord] = field(default_factory=list)


@dataclass(slots=True)
class _Attempt:
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


# ---- the router ---------------------------------------------------------------------------------------


class Router:
    """Applies `policy` to live traffic over `engines`. Framework-free; one per process (no globals)."""

    def __init__(
        self,
        engines: Mapping[str, Engine],
        policy: Policy,
        config: RouterConfig,
        *,
        sink: TurnSink | None = None,
        observer: RouterObserver | None = None,
        pin_lookup: PinLookup | None = None,
        clock: Clock = SYSTEM_CLOCK,
        kv_capacity_tokens: Mapping[str, int] | None = None,
        durability: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if not engines:
            raise EngineUnavailable(
                "the fleet has no engines. To fix: list engines or give a plan with instances."
            )
        self.policy = policy
        self.config = config
        self.sink: TurnSink = sink or _NullSink()
        self.observer: RouterObserver = observer or _NullObserver()
        self.pin_lookup = pin_lookup
        self.clock = clock  # monotonic now_s() times every turn; wall() stamps the records
        # awaited between recording an answered turn and its last byte: the record is durable by then
        # (the runtime's LedgerWriter.wait_durable; None: no wait)
        self.durability = durability
        caps = kv_capacity_tokens or {}
        self._instances: dict[str, _Instance] = {
            iid: _Instance(
                engine=e,
                instance_id=iid,
                role=Role(e.role),
                tier=e.tier,
                kv_capacity_tokens=max(1, int(caps.get(iid, 0) or getattr(e, "kv_capacity_tokens", 1))),
            )
            for iid, e in engines.items()
        }
        self._convs: dict[str, _Conversation] = {}
        self._book = PinBook(self._instances)  # pins and the tokens counted on them (orchestrator.core)
        self._pins: dict[str, str] = self._book.pins  # conversation -> decoder, what FleetView.pins shows
        self._inflight: dict[int, float] = {}  # turn -> arrival (s), while it runs (settled_before)
        self._turn_keys = itertools.count()
        self._id_prefix = os.urandom(4).hex()
        self._ids = itertools.count(1)
        self.stats = {"turns": 0, "replacements": 0, "retries": 0, "kv_transfers": 0, "errors": 0}
        self._admission_rule = rule_for(policy.name)
        self.admission_stats = {"waited": 0, "timed_out": 0}

    # ---- introspection ------------------------------------------------------------------------------
    @property
    def engines(self) -> dict[str, Engine]:
        return {iid: inst.engine for iid, inst in self._instances.items()}

    def fleet_view(self) -> FleetView:
        return FleetView(tuple(i.view() for i in self._instances.values()), self._pins)

    def instance_status(self) -> list[dict[str, Any]]:
        """Per instance: id, role, tier, health, KV occupancy, queues, pins (GET /v1/fleet, /metrics)."""
        out = []
        for inst in self._instances.values():
            v = inst.view()
            obs = inst.obs
            out.append(
                {
                    "instance_id": inst.instance_id,
                    "role": str(inst.role),
                    "tier": inst.tier,
                    "healthy": inst.healthy,
                    "down_reason": inst.down_reason,
                    "kv_capacity_tokens": inst.kv_capacity_tokens,
                    "kv_used_tokens": v.kv_used_tokens,
                    "kv_occupancy": v.kv_occupancy,
                    "engine_kv_usage_frac": obs.kv_usage_frac if obs is not None else None,
                    "running": obs.running if obs is not None else 0,
                    "waiting": obs.waiting if obs is not None else 0,
                    "inflight_requests": inst.inflight_requests,
                    "queued_prefill_tokens": inst.inflight_prefill_tokens,
                    "pinned_conversations": len(inst.pinned),
                    "pinned_tokens": inst.pinned_tokens,
                    "kv_transfers_in": inst.kv_transfers_in,
                    "engine": dict(obs.extra) if obs is not None else {},
                }
            )
        return out

    def ready(self) -> bool:
        """At least one healthy decode-capable instance (a turn can be placed)."""
        return any(i.healthy and i.role.can_decode for i in self._instances.values())

    def conversation(self, conversation_id: str) -> ConversationView | None:
        conv = self._convs.get(conversation_id)
        if conv is None:
            return None
        return ConversationView(
            conversation_id=conv.conversation_id,
            run_id=self.config.run_id,
            policy=self.policy.name,
            created_at=self.clock.wall(conv.first_arrival_s),
            pinned_instance_id=conv.pins[-1].instance_id if conv.pins else None,
            pins=tuple(conv.pins),
            turns=tuple(conv.records),
            final_turn=conv.final_turn,
            ttfet_s=conv.ttfet_s,
            e2e_s=conv.e2e_s,
            first_arrival_at=self.clock.wall(conv.first_arrival_s),
        )

    def settled_before(self) -> datetime | None:
        """Arrival of the oldest turn still running (its record is not written yet), or None when idle:
        everything that ran before this instant is recorded (energy accounting waits for it)."""
        return self.clock.wall(min(self._inflight.values())) if self._inflight else None

    def new_conversation_id(self) -> str:
        """An id for a request that named no conversation (unique per router process)."""
        return f"conv-{self._id_prefix}-{next(self._ids)}"

    def active_pin(self, conversation_id: str) -> str | None:
        return self._pins.get(conversation_id)

    # ---- health ---------------------------------------------------------------------------------------
    def mark_down(self, instance_id: str, reason: str) -> None:
        inst = self._instances.get(instance_id)
        if inst is not None and inst.healthy:
            inst.healthy = False
            inst.down_reason = reason
            log.warning("instance %s marked down: %s", instance_id, reason)

    async def poll(self) -> None:
        """Observe every engine (scheduled job): update observations and health."""

        def failed(inst: _Instance, reason: str) -> None:
            inst.failed_polls += 1
            n, limit = inst.failed_polls, self.config.down_after_failed_polls
            if n >= limit:
                self.mark_down(inst.instance_id, f"{reason} ({n} polls in a row)")
            elif inst.healthy:
                log.info("instance %s: health poll %d of %d failed: %s", inst.instance_id, n, limit, reason)

        async def one(inst: _Instance) -> None:
            try:
                # vLLM engines share one scrape between this poll and the energy tick (observe_shared)
                observe = getattr(inst.engine, "observe_shared", inst.engine.observe)
                obs = await asyncio.wait_for(observe(), self.config.observe_timeout_s)
            except Exception as err:  # an engine we cannot observe is failing, whatever the cause
                failed(inst, f"observe failed: {type(err).__name__}: {err}")
                return
            if not obs.healthy:
                failed(inst, obs.error or "engine reports unhealthy")
                return
            inst.obs = obs
            inst.failed_polls = 0
            if obs.kv_capacity_tokens > 0:
                inst.kv_capacity_tokens = obs.kv_capacity_tokens
            if not inst.healthy:
                log.warning("instance %s is back up (was down: %s)", inst.instance_id, inst.down_reason)
            inst.healthy, inst.down_reason = True, None

        await asyncio.gather(*(one(i) for i in self._instances.values()))

    def expire_idle(self, now_s: float | None = None) -> int:
        """Release pins of conversations idle longer than pin_ttl_s, and forget conversations the client
        ended more than ended_keep_s ago (scheduled job). Returns how many left memory."""
        now_s = self.clock.now_s() if now_s is None else now_s
        ttl_s, keep_s = self.config.pin_ttl_s, self.config.ended_keep_s
        stale = [c for c in self._convs.values() if now_s - c.last_active_s > (keep_s if c.ended else ttl_s)]
        for conv in stale:
            self._end(conv)
            del self._convs[conv.conversation_id]
        return len(stale)

    # ---- serving --------------------------------------------------------------------------------------
    async def complete(self, inp: TurnInput) -> dict[str, Any]:
        """Non-streaming: run the turn (streamed from the engine for timing) and return the whole body."""
        chunks: list[dict[str, Any]] = []
        async with contextlib.aclosing(self._run(inp, buffered=True)) as gen:
            async for ch in gen:
                chunks.append(ch)
        return assemble_response(inp.kind, chunks, self.config.model_name)

    def stream(self, inp: TurnInput) -> AsyncIterator[dict[str, Any]]:
        """Streaming: client chunk dicts; errors before the first chunk raise on the first anext()."""
        return self._run(inp, buffered=False)  # type: ignore[return-value]

    def stream_sse(self, inp: TurnInput) -> AsyncIterator[bytes]:
        """Streaming as SSE bytes (``data: {chunk}\n\n`` events): one block per read from the engine, except
        that the block with the first token ends at that token's event and leaves as soon as it is parsed
        (not after the rest of the read, nor, when that read was the engine's last, after the turn is
        recorded); the last block, yielded once the turn is recorded, ends with ``data: [DONE]\n\n`` (only
        then).
        Engines with ``stream_raw`` (OpenAI SSE over HTTP) are passed through byte for byte (parsed once
        with orjson for timing and accounting, never re-encoded); others are encoded here. Errors before
        the first block raise on the first anext()."""
        return self._run(inp, buffered=False, sse=True)  # type: ignore[return-value]

    async def _conversation_for(self, inp: TurnInput, now_s: float) -> _Conversation:
        cid = inp.conversation_id
        if cid is None or inp.one_turn:
            cid = cid or self.new_conversation_id()
            return _Conversation(cid, one_turn=True, first_arrival_s=now_s, last_active_s=now_s)
        conv = self._convs.get(cid)
        if conv is not None and not conv.ended:
            return conv
        if conv is not None:  # reused right after its final turn: the same conversation goes on
            return self._reopen(conv)
        conv = _Conversation(cid, one_turn=False, first_arrival_s=now_s, last_active_s=now_s)
        if self.pin_lookup is not None and _has_history(inp):
            # A continuation we do not hold in memory: another replica (shared PostgreSQL) or a restart.
            try:
                seen = await self.pin_lookup.lookup(cid)
            except ConServeError:
                seen = None
            if seen is not None and seen.turns:
                conv.turns = max(t.turn for t in seen.turns)
                if seen.first_arrival_at is not None:
                    conv.first_arrival_s = self.clock.at_s(seen.first_arrival_at)
                last = seen.turns[-1]
                conv.context_tokens = last.prompt_tokens + last.output_tokens
                conv.pins.extend(seen.pins)  # the pin history (already in the ledger: not re-recorded)
                pin = seen.pinned_instance_id
                if pin in self._instances:
                    self._pin(conv, pin, now_s, reason=None)
        self._convs[cid] = conv
        return conv

    def _reopen(self, conv: _Conversation) -> _Conversation:
        """A conversation the client ended and sends a turn to again (within ended_keep_s, before the ledger
        has surely recorded its turns): its turns go on being numbered from the last one; it is placed again
        like a turn 1 (its pin was released when it ended) without counting as a replacement."""
        conv.ended = False
        conv.reopened = True
        return conv

    async def _run(self, inp: TurnInput, buffered: bool, sse: bool = False) -> AsyncGenerator[Any, None]:
        arrival_s = self.clock.now_s()
        key = next(self._turn_keys)
        self._inflight[key] = arrival_s
        try:
            prompt_tokens = inp.prompt_tokens or estimate_prompt_tokens(inp.kind, inp.body)
            max_out = _max_output(inp.body)
            self._check_fits(prompt_tokens + (max_out or 0))  # before a turn number or an engine is used
            conv = await self._conversation_for(inp, arrival_s)
            if self.config.admission_wait_s > 0:  # before the turn is numbered: a refused turn is not one
                await self._admit(conv.turns + 1, prompt_tokens, max_out)
            treq = conv.next_turn(prompt_tokens, _max_output(inp.body))
            turn = treq.turn
            conv.last_active_s = arrival_s
            last_err: BaseException | None = None
            for attempt_no in range(self.config.max_attempts):
                placement = self._place(treq, conv, arrival_s)
                att = _Attempt(request_id=f"req-{self._id_prefix}-{next(self._ids)}", placement=placement)
                dec = self._instances[placement.decode_instance]
                failed_on: str | None = None
                kv_params = None
                status = TurnStatus.OK
                held: list[Any] = []  # buffered mode: this attempt's chunks, released on success
                try:
                    if placement.remote_prefill:
                        pre = self._instances[placement.prefill_instance]  # type: ignore[index]
                        failed_on = pre.instance_id
                        # a KV round trip (Placement.history_tokens): the decoder that served the last
                        # turn holds the history; the prefiller computes only the rest (orchestrator.core)
                        dec_holds = conv.context_tokens if conv.last_decoder == dec.instance_id else 0
                        history = round_trip_tokens(placement, treq, dec_holds)
                        remote_prefill = remote_prefill_tokens(placement, treq, history)
                        pre.inflight_prefill_tokens += remote_prefill
                        pre.inflight_requests += 1
                        try:
                            res = await pre.engine.prefill(
                                EngineRequest(
                                    inp.kind,
                                    inp.body,
                                    att.request_id + "-p",
                                    conv.conversation_id,
                                    prompt_tokens,
                                    history_tokens=history,
                                    history_source=dec.instance_id if history else None,
                                )
                            )
                        finally:
                            pre.inflight_prefill_tokens -= remote_prefill
                            pre.inflight_requests -= 1
                        kv_params = res.kv_transfer_params
                        att.prefill_cached_tokens = res.cached_tokens
                        self.stats["kv_transfers"] += 1
                        dec.kv_transfers_in += 1
                        self.observer.kv_transfer(pre.instance_id, dec.instance_id, res.transferred_bytes)
                    failed_on = dec.instance_id
                    body = dict(inp.body)
                    body["stream"] = True
                    body["stream_options"] = {"include_usage": True}
                    local_prefill = local_prefill_tokens(placement, treq)
                    dec.inflight_prefill_tokens += local_prefill
                    dec.inflight_requests += 1
                    try:
                        ereq = EngineRequest(
                            inp.kind,
                            body,
                            att.request_id,
                            conv.conversation_id,
                            prompt_tokens,
                            kv_transfer_params=kv_params,
                        )
                        async with contextlib.aclosing(_engine_events(dec.engine, ereq)) as batches:
                            prev_s = 0.0
                            async for batch, last in batches:
                                now = self.clock.now_s()
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
                                        produced = (
                                            c0.get("text")
                                            if delta is None
                                            else (
                                                delta.get("content")
                                                or delta.get("tool_calls")
                                                or delta.get("reasoning_content")
                                            )
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
                                        raise EngineAnsweredError(
                                            f"engine {dec.instance_id!r} failed mid-stream: {msg}"
                                        )
                                    usage = ch.get("usage")
                                    if usage:
                                        att.usage = usage
                                        if not choices and not inp.include_usage and not buffered:
                                            continue
                                    if not sse:
                                        out.append(ch)
                                    elif raw is not None:
                                        out.append(raw)
                                    else:
                                        out.append(b"data: " + _dumps(ch) + b"\n\n")
                                    if first_token and sse and not buffered:
                                        # the first token leaves now, before the rest of this read is
                                        # parsed and (if it was the engine's last read) the turn recorded
                                        att.sent = True
                                        yield out[0] if len(out) == 1 else b"".join(out)
                                        out = []
                                if not out:
                                    continue
                                if buffered or (sse and last):
                                    # the engine's last read: sent after the turn is recorded, with [DONE]
                                    held.extend(out)
                                elif sse:
                                    att.sent = True
                                    yield out[0] if len(out) == 1 else b"".join(out)
                                else:
                                    att.sent = True
                                    for ch in out:
                                        yield ch
                        att.last_s = self.clock.now_s()
                    finally:
                        dec.inflight_prefill_tokens -= local_prefill
                        dec.inflight_requests -= 1
                except ENGINE_FAILURES as err:
                    last_err = err
                    assert failed_on is not None
                    status_code = getattr(err, "status", None)
                    if isinstance(status_code, int) and 400 <= status_code < 500:
                        # the engine judged the request invalid: not an engine failure, no retry
                        self._finish(conv, treq, att, arrival_s, TurnStatus.ERROR, inp.client_final)
                        raise EngineRejected(str(err), status_code) from err
                    if isinstance(err, EngineAnsweredError) or isinstance(status_code, int):
                        # it answered (HTTP 5xx, or an error event in the stream): alive, e.g. a failed
                        # KV pull; the health polls decide whether it is down, the retry may land on it
                        log.warning("engine %s answered with an error (kept up): %s", failed_on, err)
                    else:  # unreachable, reset or timed out: down until a health poll sees it again
                        self.mark_down(failed_on, f"{type(err).__name__}: {err}")
                    status = TurnStatus.ERROR if att.sent else TurnStatus.REPLACED
                    self._finish(conv, treq, att, arrival_s, status, inp.client_final)
                    if att.sent or attempt_no + 1 >= self.config.max_attempts:
                        self.stats["errors"] += 1
                        raise EngineUnavailable(
                            f"engine {failed_on} failed while serving conversation {conv.conversation_id} "
                            f"turn {turn}"
                            + (" after output was streamed" if att.sent else " (retried once)")
                            + f": {err}. The conversation is kept; send the turn again to re-place it."
                        ) from err
                    self.stats["retries"] += 1
                    self.observer.retried(failed_on)
                    continue
                except BaseException:
                    # client went away (cancelled / generator closed) or an unexpected bug: record, re-raise
                    self._finish(conv, treq, att, arrival_s, TurnStatus.ERROR, inp.client_final)
                    raise
                self._finish(conv, treq, att, arrival_s, status, inp.client_final)
                if self.durability is not None:
                    await self.durability()  # the turn's record is committed before its last byte leaves
                if sse:
                    held.append(SSE_DONE)
                    yield b"".join(held)
                    return
                for ch in held:
                    yield ch
                return
            raise EngineUnavailable(f"no engine could serve the turn: {last_err}")  # pragma: no cover
        finally:
            self._inflight.pop(key, None)

    # ---- placement and pins -------------------------------------------------------------------------
    def _check_fits(self, need_tokens: int) -> None:
        """A turn that no decode-capable instance could hold (prompt + max_tokens over the largest KV
        capacity) is the client's error: PromptTooLarge (API: 400) before placement, so no engine is tried,
        fails or is marked down for it. Instances that are down count: their capacity comes back."""
        largest = max(
            (i.kv_capacity_tokens for i in self._instances.values() if i.role.can_decode), default=0
        )
        if need_tokens > largest:
            raise PromptTooLarge(
                f"this turn needs ~{need_tokens} tokens of KV cache (prompt + max_tokens), more than any "
                f"instance of this fleet holds: the largest decode-capable instance holds {largest} tokens. "
                "To fix: shorten the prompt or lower max_tokens.",
                limit_tokens=largest,
            )

    async def _admit(self, k: int, prompt_tokens: int, max_out: int | None) -> None:
        """Wait (bounded) until some healthy decode-capable instance has room for turn `k`'s reservation;
        refuse it after the wait (orchestrator.core.admission: admit; the API answers 503 + Retry-After)."""
        pad = [0] * (k - 1)
        need = reservation_tokens(self._admission_rule, k, [*pad, prompt_tokens], [*pad, max_out or 0])[0]
        if need <= 0:
            return
        start, wait_s, waited = self.clock.now_s(), self.config.admission_wait_s, False
        while True:
            waited_s = self.clock.now_s() - start
            decision = admit(any_room(self.fleet_view().instances, need), waited_s, wait_s)
            if decision is not Admit.WAIT:
                break
            if not waited:
                waited = True
                self.admission_stats["waited"] += 1
            await asyncio.sleep(min(self.config.admission_poll_s, wait_s - waited_s))
        if decision is Admit.REJECT:
            self.admission_stats["timed_out"] += 1
            raise AdmissionTimedOut(refusal_message(need, wait_s), retry_after_s(wait_s))

    def _place(self, treq: TurnRequest, conv: _Conversation, now_s: float) -> Placement:
        try:
            placement = self.policy.place(treq, self.fleet_view())
        except PlacementError as err:
            down = [f"{i.instance_id}: {i.down_reason}" for i in self._instances.values() if not i.healthy]
            detail = f" Down: {'; '.join(down)}." if down else ""
            raise EngineUnavailable(f"{err}{detail}") from err
        for iid in (placement.decode_instance, placement.prefill_instance):
            if iid is not None and iid not in self._instances:
                raise EngineUnavailable(f"policy {self.policy.name} chose unknown instance {iid!r}")
        old = conv.pin
        # Placement.pin asks to (re)bind the conversation; without it an existing pin stays as it is and
        # none is made (orchestrator.core.turns): policies that never pin (per-turn, full-disagg,
        # round-robin, kv-aware) have nothing held for a conversation between turns
        if moves_pin(placement, old):
            reason = pin_reason(placement, old, treq.turn > 1 and not conv.one_turn and not conv.reopened)
            if reason != "placed":
                self.stats["replacements"] += 1
                self.observer.replaced(conv.conversation_id, old, placement.decode_instance)
            self._pin(conv, placement.decode_instance, now_s, reason=reason)
        self._book.account(conv, running_turn_kv_tokens(treq))
        return placement

    def _pin(self, conv: _Conversation, instance_id: str, now_s: float, reason: str | None) -> None:
        self._book.pin(conv, instance_id)
        if reason is not None and (not conv.one_turn or reason != "placed"):
            rec = PinRecord(conv.conversation_id, instance_id, self.clock.wall(now_s), reason)
            if not conv.one_turn:
                conv.pins.append(rec)
            self.sink.pin(rec)

    def _end(self, conv: _Conversation) -> None:
        self._book.unpin(conv)
        conv.ended = True
        self.policy.forget(conv.conversation_id)

    # ---- recording ----------------------------------------------------------------------------------
    def _finish(
        self,
        conv: _Conversation,
        treq: TurnRequest,
        att: _Attempt,
        arrival_s: float,
        status: TurnStatus,
        client_final: bool,
    ) -> None:
        pl = att.placement
        usage = att.usage or {}
        prompt = int(usage.get("prompt_tokens") or treq.input_tokens)
        output = int(usage.get("completion_tokens") or att.tokens)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            cached = int(details["cached_tokens"])
        else:  # an engine that does not report it (vLLM without --enable-prompt-tokens-details): a remote
            # prefill's KV arrived by transfer, so the decoder computed (at most) a block of it; local
            # prefix-cache hits are unknown per turn (the model meter still subtracts them per interval)
            cached = prompt if pl.remote_prefill else 0
        ok = status is TurnStatus.OK
        natural_final = att.finish_reason == "stop" and not att.tool_calls
        is_final = ok and (client_final or natural_final or conv.one_turn)
        dec = self._instances[pl.decode_instance]
        rec = TurnRecord(
            conversation_id=conv.conversation_id,
            turn=treq.turn,
            request_id=att.request_id,
            instance_id=pl.decode_instance,
            arrival_at=self.clock.wall(arrival_s),
            first_token_at=_wall(self.clock, att.first_s),
            last_token_at=_wall(self.clock, att.last_s),
            prompt_tokens=prompt,
            output_tokens=output,
            finish_reason=att.finish_reason,
            is_final=is_final,
            status=status,
            prefill_instance_id=pl.prefill_instance if pl.remote_prefill else None,
            remote_prefill=pl.remote_prefill,
            tier=dec.tier,
            cached_tokens=min(cached, prompt),
            policy=self.policy.name,
            prefill_cached_tokens=min(att.prefill_cached_tokens, prompt) if pl.remote_prefill else 0,
        )
        self.sink.turn(rec)
        if not conv.one_turn:
            conv.records.append(rec)
        ttfet = None
        if ok:
            self.stats["turns"] += 1
            ttfet = conv.turn_ended(
                treq.turn, prompt, output, pl.decode_instance, is_final, att.first_s, att.last_s
            )
            conv.last_active_s = att.last_s or self.clock.now_s()
            self._book.account(conv, conv.context_tokens)
            self.policy.observe_turn_end(conv.conversation_id, treq.turn, output)
            if client_final:
                self._end(conv)
        self.observer.turn_done(
            rec, (att.first_s - arrival_s) if att.first_s is not None else None, att.gaps_s, ttfet
        )
        if conv.one_turn and (ok or status is TurnStatus.ERROR):
            self._end(conv)

    async def aclose(self) -> None:
        await asyncio.gather(*(i.engine.aclose() for i in self._instances.values()), return_exceptions=True)


# ---- engine event streams -----------------------------------------------------------------------------


SSE_DONE = b"data: [DONE]\n\n"


class RawSseEngine(Protocol):
    """Optional engine capability: the engine's OpenAI SSE response bytes as they arrive (any blocks)."""

    def stream_raw(self, req: EngineRequest) -> AsyncIterator[bytes]: ...


# What _engine_events yields per read: (chunk dict, None) from engines that stream dicts, or (JSON payload,
# event bytes) from raw-SSE engines, parsed by the router one event at a time (parse_event).
_Events = Sequence[tuple[Any, bytes | None]]


async def _engine_events(engine: Engine, req: EngineRequest) -> AsyncGenerator[tuple[_Events, bool], None]:
    """(batch, last): one batch per read from the engine; `last` is True when the engine's ``[DONE]`` was
    in this read (known for SSE engines only)."""
    raw = getattr(engine, "stream_raw", None)
    if raw is None:
        async with contextlib.aclosing(engine.stream(req)) as chunks:  # type: ignore[type-var]
            async for ch in chunks:
                yield [(ch, None)], False
        return
    parser = SseSplitter()
    async with contextlib.aclosing(raw(req)) as blocks:
        async for block in blocks:
            events = parser.split(block)
            if parser.done:
                yield events, True
                return
            if events:
                yield events, False
    yield parser.close(), True


class SseSplitter:
    """Incremental OpenAI-style SSE splitter: blocks of bytes in, (JSON payload, event bytes) out; the
    payloads are parsed with :func:`parse_event`.

    Events are separated by a blank line; ``data:`` lines carry JSON; ``data: [DONE]`` ends the stream;
    comments (``:``) are skipped. The event bytes returned are ``data: {json}\n\n``, ready to forward.
    """

    __slots__ = ("_buf", "done")

    def __init__(self) -> None:
        self._buf = b""
        self.done = False

    def split(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The complete events in `block`, unparsed: (JSON payload, event bytes to forward). The router
        parses them one at a time, so the first token can leave before the rest of a read is parsed."""
        if self._buf:
            block = self._buf + block
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n")
        parts = block.split(b"\n\n")
        self._buf = parts.pop()  # incomplete last event (b"" when the block ended on a boundary)
        out: list[tuple[bytes, bytes]] = []
        for ev in parts:
            if self.done:
                break
            self._event(ev, out)
        return out

    def close(self) -> list[tuple[bytes, bytes]]:
        """The stream ended: an event without its trailing blank line still counts."""
        out: list[tuple[bytes, bytes]] = []
        if self._buf.strip() and not self.done:
            self._event(self._buf.strip(b"\n"), out)
        self._buf = b""
        return out

    def _event(self, ev: bytes, out: list[tuple[bytes, bytes]]) -> None:
        if ev.startswith(b"data: ") and b"\n" not in ev:  # the usual form: one data line
            payload, fwd = ev[6:], ev + b"\n\n"
        else:
            lines = [ln[5:].lstrip(b" ") for ln in ev.split(b"\n") if ln.startswith(b"data:")]
            if not lines:
                return  # comment / keep-alive / other field
            payload = b"\n".join(lines)
            fwd = b"data: " + payload + b"\n\n"
        if payload.strip() == b"[DONE]":
            self.done = True
            return
        out.append((payload, fwd))


def parse_event(payload: bytes, engine_id: str = "?") -> dict[str, Any]:
    """One SSE event's JSON payload -> the chunk dict (an EngineError names the engine otherwise)."""
    try:
        obj = _loads(payload)
    except ValueError as err:
        raise EngineError(
            f"engine {engine_id!r} sent an SSE event that is not JSON: {payload[:200]!r}"
        ) from err
    if not isinstance(obj, dict):
        raise EngineError(
            f"engine {engine_id!r} sent an SSE event that is not a JSON object: {payload[:200]!r}"
        )
    return obj


# ---- helpers ------------------------------------------------------------------------------------------


def _max_output(body: Mapping[str, Any]) -> int | None:
    cap = body.get("max_completion_tokens")
    if cap is None:
        cap = body.get("max_tokens")
    return cap if isinstance(cap, int) and not isinstance(cap, bool) else None


def _has_history(inp: TurnInput) -> bool:
    if inp.kind is RequestKind.CHAT:
        return any(
            isinstance(m, dict) and m.get("role") in ("assistant", "tool")
            for m in inp.body.get("messages") or ()
        )
    return True


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
