"""The Router: the live driver over the driver core -- one turn from arrival to its record.

The steps of a turn, each in its own module of this package:

1. place (here, :meth:`Router._place`): the policy decides from the fleet view
   (orchestrator.router.instances builds it); pins and the tokens counted on them follow the Placement
   (orchestrator.core); an optional bounded admission wait comes first (:meth:`Router._admit`);
2. prefill and hand-off (orchestrator.router.prefill), for a remote-prefill placement;
3. decode (orchestrator.router.decode): the decoder's stream, timed and counted, as typed Output events;
4. on an engine failure, its classification (orchestrator.router.failures): retry, mark down, or fail;
5. record (here, :meth:`Router._finish`) the turn and its pins through the TurnSink, then the output adapter
   (orchestrator.router.adapters) closes the answer: SSE bytes, chunk dicts or one JSON body.

Must not import fastapi, starlette or sqlalchemy (the API and the ledger are edges).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conserve.clock import SYSTEM_CLOCK, Clock
from conserve.errors import ConServeError
from energy.records import ConversationView, PinRecord, TurnRecord, TurnStatus
from orchestrator.core import (
    ConversationState,
    PinBook,
    local_prefill_tokens,
    moves_pin,
    pin_reason,
    rule_for,
    running_turn_kv_tokens,
)
from orchestrator.engines.base import Engine, EngineRequest
from orchestrator.replicas import SharedTurns, agreed_placement, claim_turn, settle
from orchestrator.router.adapters import ChunkOutput, JsonOutput, OutputAdapter, SseOutput
from orchestrator.router.admission import admit_or_refuse
from orchestrator.router.decode import Attempt, decode_stream
from orchestrator.router.failures import ENGINE_FAILURES, FailureKind, outcome
from orchestrator.router.instances import Instance, check_fits
from orchestrator.router.prefill import prefill_remote
from orchestrator.router.values import (
    EngineRejected,
    EngineUnavailable,
    NullObserver,
    NullSink,
    PinLookup,
    RouterConfig,
    RouterObserver,
    TurnInput,
    TurnSink,
    estimate_prompt_tokens,
    has_history,
    max_output,
)
from placement.base import FleetView, Placement, Policy, Role, TurnRequest
from placement.errors import PlacementError

__all__ = ["Router"]

log = logging.getLogger("orchestrator.router")


def _wall(clock: Clock, at_s: float | None) -> datetime | None:
    return None if at_s is None else clock.wall(at_s)


@dataclass(slots=True, eq=False)
class _Conversation(ConversationState):
    """The core's conversation state (orchestrator.core.conversations) + what the router records."""

    one_turn: bool = False
    last_active_s: float = 0.0
    reopened: bool = False  # sent a turn again after the client ended it (Router._reopen)
    records: list[TurnRecord] = field(default_factory=list)
    pins: list[PinRecord] = field(default_factory=list)


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
        shared: SharedTurns | None = None,
    ) -> None:
        if not engines:
            raise EngineUnavailable(
                "the fleet has no engines. To fix: list engines or give a plan with instances."
            )
        self.policy = policy
        self.config = config
        self.sink: TurnSink = sink or NullSink()
        self.observer: RouterObserver = observer or NullObserver()
        self.pin_lookup = pin_lookup
        self.clock = clock  # monotonic now_s() times every turn; wall() stamps the records
        # awaited between recording an answered turn and its last byte: the record is durable by then
        # (the runtime's LedgerWriter.wait_durable; None: no wait)
        self.durability = durability
        self.shared = shared  # replicas on one PostgreSQL ledger: turn numbers and pins decided there
        caps = kv_capacity_tokens or {}
        self._instances: dict[str, Instance] = {
            iid: Instance(
                engine=e,
                instance_id=iid,
                role=Role(e.role),
                tier=e.tier,
                kv_capacity_tokens=max(1, int(caps.get(iid, 0) or e.kv_capacity_tokens)),
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
        return [inst.status() for inst in self._instances.values()]

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
            pinned_instance_id=conv.pin or (conv.pins[-1].instance_id if conv.pins else None),
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

    def gap_state(self) -> tuple[Mapping[str, _Conversation], PinBook]:
        """Conversations and pin book, for the KV-gap keeper (orchestrator/kv_gaps_live.py) to release."""
        return self._convs, self._book

    # ---- health ---------------------------------------------------------------------------------------
    def mark_down(self, instance_id: str, reason: str) -> None:
        inst = self._instances.get(instance_id)
        if inst is not None:
            inst.mark_down(reason)

    async def poll(self) -> None:
        """Observe every engine (scheduled job): update observations and health."""
        timeout_s, limit = self.config.observe_timeout_s, self.config.down_after_failed_polls
        await asyncio.gather(*(i.poll(timeout_s, limit) for i in self._instances.values()))

    def expire_idle(self, now_s: float | None = None) -> int:
        """Release pins of conversations idle longer than pin_ttl_s, and forget conversations the client
        ended more than ended_keep_s ago (scheduled job). Returns how many left memory."""
        now_s = self.clock.now_s() if now_s is None else now_s
        ttl_s, keep_s = self.config.pin_ttl_s, self.config.ended_keep_s
        stale = [c for c in self._convs.values() if now_s - c.last_active_s > (keep_s if c.ended else ttl_s)]
        for conv in stale:
            self._end(conv)
            del self._convs[conv.conversation_id]
            self.observer.forgotten(conv.conversation_id)
        return len(stale)

    # ---- serving --------------------------------------------------------------------------------------
    async def complete(self, inp: TurnInput) -> dict[str, Any]:
        """Non-streaming: run the turn (streamed from the engine for timing) and return the whole body."""
        out: list[dict[str, Any]] = []
        async with contextlib.aclosing(self._run(inp, JsonOutput(inp.kind, self.config.model_name))) as gen:
            async for body in gen:  # one: the body once the turn is recorded
                out.append(body)
        return out[-1]

    async def stream(self, inp: TurnInput) -> AsyncIterator[dict[str, Any]]:
        """Streaming: client chunk dicts; errors before the first chunk raise on the first anext()."""
        async with contextlib.aclosing(self._run(inp, ChunkOutput(inp.include_usage))) as gen:
            async for chunks in gen:
                for ch in chunks:
                    yield ch

    def stream_sse(self, inp: TurnInput) -> AsyncIterator[bytes]:
        """Streaming as SSE bytes (``data: {chunk}\\n\\n`` events): one block per read from the engine, except
        that the block with the first token ends at that token's event and leaves as soon as it is parsed
        (not after the rest of the read, nor, when that read was the engine's last, after the turn is
        recorded); the last block, yielded once the turn is recorded, ends with ``data: [DONE]\\n\\n`` (only
        then). SSE engines (``Engine.wire``) are passed through byte for byte (parsed once with orjson for
        timing and accounting, never re-encoded); others are encoded here (orchestrator.router.adapters).
        Errors before the first block raise on the first anext()."""
        return self._run(inp, SseOutput(inp.include_usage))

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
        if self.pin_lookup is not None and has_history(inp):
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

    async def _run(self, inp: TurnInput, adapter: OutputAdapter) -> AsyncGenerator[Any, None]:
        """One turn: what `adapter` makes of its decode events, then of the recorded turn (see the module
        docstring for the steps)."""
        arrival_s = self.clock.now_s()
        key = next(self._turn_keys)
        self._inflight[key] = arrival_s
        try:
            prompt_tokens = inp.prompt_tokens or estimate_prompt_tokens(inp.kind, inp.body)
            cap = max_output(inp.body)
            # before a turn number or an engine is used
            check_fits(self._instances.values(), prompt_tokens + (cap or 0))
            conv = await self._conversation_for(inp, arrival_s)
            # the admission seam: a bounded wait for KV room before placement (RouterConfig.admission_wait_s),
            # before the turn is numbered: a refused turn is not one
            if self.config.admission_wait_s > 0:
                await self._admit(conv.turns + 1, prompt_tokens, cap)
            shared = None if conv.one_turn else self.shared  # replicas agree there (orchestrator/replicas.py)
            if shared is not None:
                await claim_turn(shared, conv, self._book, self._instances, self.clock, arrival_s)
            treq = conv.next_turn(prompt_tokens, cap)
            conv.last_active_s = arrival_s
            for attempt_no in range(self.config.max_attempts):
                placement = await self._place(treq, conv, arrival_s)
                att = Attempt(request_id=f"req-{self._id_prefix}-{next(self._ids)}", placement=placement)
                dec = self._instances[placement.decode_instance]
                failed_on = dec.instance_id
                held: list[Any] = []  # what the adapter holds until the turn is recorded
                try:
                    kv_params = None
                    if placement.remote_prefill:
                        pre = self._instances[placement.prefill_instance]  # type: ignore[index]
                        failed_on = pre.instance_id
                        res = await prefill_remote(
                            pre,
                            dec,
                            placement,
                            treq,
                            conv.context_tokens if conv.last_decoder == dec.instance_id else 0,
                            inp.kind,
                            inp.body,
                            att.request_id + "-p",
                            conv.conversation_id,
                            prompt_tokens,
                        )
                        kv_params = res.kv_transfer_params
                        att.prefill_cached_tokens = res.cached_tokens
                        self.stats["kv_transfers"] += 1
                        self.observer.kv_transfer(pre.instance_id, dec.instance_id, res.transferred_bytes)
                        failed_on = dec.instance_id
                    body = dict(inp.body)
                    body["stream"] = True
                    body["stream_options"] = {"include_usage": True}
                    ereq = EngineRequest(
                        inp.kind,
                        body,
                        att.request_id,
                        conv.conversation_id,
                        prompt_tokens,
                        kv_transfer_params=kv_params,
                    )
                    events = decode_stream(
                        dec, ereq, att, adapter, self.clock, local_prefill_tokens(placement, treq)
                    )
                    async with contextlib.aclosing(events):
                        async for out in events:
                            if adapter.holds(out):
                                held.extend(out.items)
                                continue
                            att.sent = True
                            yield adapter.block(out.items)
                except ENGINE_FAILURES as err:
                    self._failed(conv, treq, att, arrival_s, inp.client_final, err, failed_on, attempt_no)
                    continue  # _failed raised unless the turn is retried
                except BaseException:
                    # client went away (cancelled / generator closed) or an unexpected bug: record, re-raise
                    self._finish(conv, treq, att, arrival_s, TurnStatus.ERROR, inp.client_final)
                    raise
                self._finish(conv, treq, att, arrival_s, TurnStatus.OK, inp.client_final)
                # the turn's record is committed (and replicas told) before its last byte leaves
                await settle(self.durability, shared, conv, treq.turn, self.clock)
                final = adapter.close(held)
                if final is not None:
                    yield final
                return
            raise AssertionError("unreachable: the last attempt's failure raised")  # pragma: no cover
        finally:
            self._inflight.pop(key, None)

    def _failed(
        self,
        conv: _Conversation,
        treq: TurnRequest,
        att: Attempt,
        arrival_s: float,
        client_final: bool,
        err: BaseException,
        failed_on: str,
        attempt_no: int,
    ) -> None:
        """Record a failed attempt as orchestrator.router.failures classifies it; returns only when the turn
        is to be placed again, raises EngineRejected / EngineUnavailable otherwise."""
        out = outcome(err, sent=att.sent, attempts_left=self.config.max_attempts - attempt_no - 1)
        if out.kind is FailureKind.REJECTED:  # the client's error: the engine is fine, no retry
            self._finish(conv, treq, att, arrival_s, out.record, client_final)
            assert out.status is not None
            raise EngineRejected(str(err), out.status) from err
        if out.mark_down:
            self.mark_down(failed_on, f"{type(err).__name__}: {err}")
        else:
            log.warning("engine %s answered with an error (kept up): %s", failed_on, err)
        self._finish(conv, treq, att, arrival_s, out.record, client_final)
        if not out.retry:
            self.stats["errors"] += 1
            raise EngineUnavailable(
                f"engine {failed_on} failed while serving conversation {conv.conversation_id} "
                f"turn {treq.turn}"
                + (" after output was streamed" if att.sent else " (retried once)")
                + f": {err}. The conversation is kept; send the turn again to re-place it."
            ) from err
        self.stats["retries"] += 1
        self.observer.retried(failed_on)

    # ---- placement and pins -------------------------------------------------------------------------
    async def _admit(self, k: int, prompt_tokens: int, max_out: int | None) -> None:
        """The admission step (orchestrator.router.admission): a bounded wait for KV room for turn `k`'s
        reservation, then AdmissionTimedOut (the API answers 503 + Retry-After)."""
        cfg, rule, view = self.config, self._admission_rule, self.fleet_view
        waits = (cfg.admission_wait_s, cfg.admission_poll_s, self.admission_stats)
        await admit_or_refuse(rule, k, prompt_tokens, max_out, view, self.clock, *waits)

    async def _place(self, treq: TurnRequest, conv: _Conversation, now_s: float) -> Placement:
        shared = None if conv.one_turn else self.shared  # replicas: a pin moves by compare-and-set there
        agreed = await agreed_placement(shared, conv, self._book, self._instances, self._decide, treq)
        if agreed is None:
            raise EngineUnavailable(f"replicas kept re-pinning {conv.conversation_id}; send it again")
        placement = agreed
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

    def _decide(self, treq: TurnRequest) -> Placement:
        """The policy's placement of `treq` on the current fleet view, on instances this router knows."""
        try:
            placement = self.policy.place(treq, self.fleet_view())
        except PlacementError as err:
            down = [f"{i.instance_id}: {i.down_reason}" for i in self._instances.values() if not i.healthy]
            detail = f" Down: {'; '.join(down)}." if down else ""
            raise EngineUnavailable(f"{err}{detail}") from err
        for iid in (placement.decode_instance, placement.prefill_instance):
            if iid is not None and iid not in self._instances:
                raise EngineUnavailable(f"policy {self.policy.name} chose unknown instance {iid!r}")
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
        att: Attempt,
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
            self.observer.forgotten(conv.conversation_id)  # never in memory: gone once recorded

    async def aclose(self) -> None:
        await asyncio.gather(*(i.engine.aclose() for i in self._instances.values()), return_exceptions=True)
