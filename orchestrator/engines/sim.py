"""A simulated engine that serves from a tier model on an injected clock, so `orchestrator serve` runs with no
GPU. It implements the Engine protocol (orchestrator/engines/base.py) as a vLLM server behaves, on the
discrete-event simulator's instance step and link models (tiers/steps.py; tests/core/test_engine_model.py
checks that both put every token at the same instant):

- continuous batching in one asyncio task: each step admits waiting requests (FCFS, head of line) while
  ``max_num_seqs`` and the KV reservations (prompt + output, whole blocks; cached prefixes evicted LRU) allow,
  decodes a token for every running sequence, spends the rest of ``max_batched_tokens`` on prefill chunks
  (``tiers.steps.plan_chunks``) and lasts ``tiers.steps.prefill_step_time_s`` (or the decode step);
- vLLM-like observations (``EngineObservation``), plus the modelled energy of the steps
  (energy/meters.py ``STEP_ENERGY_J_TOTAL``, ``BUSY_S_TOTAL``);
- a prefix cache per conversation (whole blocks): a later turn prefills only its increment;
- remote decode: ``prefill()`` returns ``kv_transfer_params`` a decoder accepts once (:class:`SimKvFabric`);
  the decoder reserves the KV, then receives what it does not hold over the slower of the two links
  (``tiers.steps.handoff_time_s``); a prefill with ``history_tokens`` (a KV round trip) pulls that history
  from ``history_source`` first, and the hand-back pays the round trip's bookkeeping.

One simplification against the simulator: a prefiller frees a prefill's KV (into its prefix cache) when the
prefill ends, not once the decoder has it (matters only when its KV is full). Text is synthetic and says so
(sim_text.py). Must not import fastapi, sqlalchemy or httpx. Time: an injected clock (conserve/clock.py).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from conserve.clock import Clock, SystemClock
from energy.meters import (
    ENGINE_STEPS_TOTAL,
    EXTERNAL_HITS_TOTAL,
    GENERATION_TOKENS_TOTAL,
    PROMPT_TOKENS_TOTAL,
)
from orchestrator.core.turns import kv_shipped_tokens
from orchestrator.engines.base import EngineObservation, EngineRequest, KvReleased, PrefillResult
from orchestrator.engines.sim_fabric import DEFAULT_LINK, PrefixCache, SimKvFabric
from orchestrator.engines.sim_meter import StepMeter
from orchestrator.engines.sim_text import (
    DEFAULT_NATURAL_OUTPUT_TOKENS,
    SIM_TEXT_PREFIX,
    collect_completion,
    openai_chunks,
    requested_max,
)
from orchestrator.engines.sse import ChunkNative
from orchestrator.errors import EngineError
from placement.base import Role
from placement.kv_gaps import GapAction
from tiers.perf import TierModel
from tiers.steps import handoff_time_s, plan_chunks, prefill_step_power_w, prefill_step_time_s

__all__ = [
    "DEFAULT_NATURAL_OUTPUT_TOKENS",
    "SIM_TEXT_PREFIX",
    "SimClock",
    "SimEngine",
    "SimKvFabric",
    "WallClock",
]

# The project's clocks (conserve/clock.py); a SystemClock(speedup) makes a modelled second 1/speedup real s.
SimClock = Clock
WallClock = SystemClock

_END = object()


@dataclass(slots=True, eq=False)
class _Seq:
    req_id: str
    conversation_id: str
    prompt_tokens: int
    max_out: int  # 0: prefill only (remote decode)
    reserve: int  # KV tokens reserved while it runs (prompt + output, whole blocks)
    pulled: int = 0  # history tokens whose KV came from a decoder before the prefill (a round trip)
    handle_tokens: int = -1  # >= 0: decode of a remote prefill of that many tokens (the KV arrives)
    round_trip: bool = False
    source_link: str = DEFAULT_LINK  # the prefiller's link (a decode of a remote prefill)
    cached_tokens: int = 0  # prompt tokens already in KV (prefix cache hit or transferred), set on admission
    prefill_left: int = 0
    ready: bool = True  # False while its KV is in transfer
    admitted: bool = False
    out: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    produced: int = 0
    prefill_done: asyncio.Future[None] | None = None
    ended: bool = False  # finished or aborted: out of the batch

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.produced


class SimEngine(ChunkNative):
    """An Engine whose timing comes from a TierModel; see the module docstring. In process: its native stream
    is chunk dicts (ChunkNative: wire, stream_raw, observe_shared)."""

    kv_offload = False  # no host-memory tier: release_kv drops (the next turn re-prefills from its prefix)

    def __init__(
        self,
        instance_id: str,
        role: Role,
        tier: str,
        tier_model: TierModel,
        *,
        model_name: str,
        clock: Clock | None = None,
        fabric: SimKvFabric | None = None,
        link: str = DEFAULT_LINK,  # the tier's interconnect (tiers.links.LinkType), as the simulator's links
        max_num_seqs: int = 256,  # vLLM's default --max-num-seqs
        max_batched_tokens: int = 8192,  # vLLM's default chunked-prefill budget on datacenter GPUs (V1)
        natural_output_tokens: int = DEFAULT_NATURAL_OUTPUT_TOKENS,
    ) -> None:
        self.instance_id = instance_id
        self.role = Role(role)
        self.tier = tier
        self.tier_model = tier_model
        self.model_name = model_name
        self.clock: Clock = clock or SystemClock()
        self.fabric = fabric or SimKvFabric()
        self.link = str(link)
        self.fabric.attach(instance_id, self.link)
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.natural_output_tokens = natural_output_tokens
        self.kv_capacity_tokens = tier_model.kv_capacity_tokens
        self._block = int(tier_model.block_size_tokens)
        self._kvb = int(tier_model.model.kv_bytes_per_token)
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._reserved = 0  # KV tokens reserved by the running sequences
        self._prefix = PrefixCache()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._transfers: set[asyncio.Task[None]] = set()
        self._dead = False
        self._ids = itertools.count(1)
        # counters, like vLLM's Prometheus counters
        self.prefix_cache_hits_tokens = 0
        self.prefix_cache_queries_tokens = 0
        self.kv_transfer_bytes = 0
        self.kv_transfers_accepted = 0
        self.kv_transfers_sent = 0
        # prompt tokens counted as vLLM's counters add up: the cached part when the request is admitted
        # (with the prefix-cache or external hit that covers it), the computed part as each chunk runs, so
        # prompt - hits - external hits is the prefill computed so far
        self.prompt_tokens_total = 0
        self.external_prefix_cache_hits_tokens = 0
        self.generation_tokens_total = 0
        self.engine_steps_total = 0
        self.meter = StepMeter(self.clock)  # the modelled energy of the steps

    # ---- failure injection ----------------------------------------------------------------------
    @property
    def dead(self) -> bool:
        return self._dead

    def kill(self) -> None:
        """Crash the engine: in-flight and later requests fail with EngineError until `revive()`."""
        self._dead = True
        for seq in list(self._running) + list(self._waiting):
            self._fail(seq, f"engine {self.instance_id} died")
        self._running.clear()
        self._waiting.clear()
        self._reserved = 0
        self._prefix.clear()
        for task in list(self._transfers):
            task.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None

    def revive(self) -> None:
        self._dead = False

    # ---- the power controller's hooks (orchestrator/power_loop.py) ------------------------------------
    def park(self, parked_w: float) -> None:
        """Engine stopped (no CUDA context): it draws ``parked_w`` in place of the loaded idle."""
        if self._running or self._waiting:
            raise EngineError(f"engine {self.instance_id}: cannot park with requests running or waiting")
        self.meter.park(parked_w)

    def unpark(self) -> None:  # cold start begins: the loaded idle draw again
        self.meter.unpark()

    def set_power_cap(self, cap_w: float) -> TierModel:
        """Steps from the next one on are timed and powered by the tier model at ``cap_w`` per GPU."""
        if self.tier_model.cap_w != cap_w:  # TierModel checks the range
            self.tier_model = replace(self.tier_model, power_cap_w=float(cap_w))
        return self.tier_model

    # ---- Engine protocol ------------------------------------------------------------------------
    async def prefill(self, req: EngineRequest) -> PrefillResult:
        self._check_alive()
        seq = await self._submit(req, prefill_only=True)
        assert seq.prefill_done is not None
        try:
            await seq.prefill_done
        except asyncio.CancelledError:  # the caller gave up (client disconnect): drop the prefill
            if not seq.ended:
                self._abort(seq)
            raise
        transfer_id = self.fabric.register(
            self.instance_id, req.conversation_id, seq.prompt_tokens, round_trip=seq.pulled > 0
        )
        self.kv_transfers_sent += 1
        nbytes = seq.prompt_tokens * self._kvb
        params = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.instance_id,
            "remote_block_ids": list(range(-(-seq.prompt_tokens // self._block))),
            "remote_host": "sim",
            "remote_port": 0,
            "sim_transfer_id": transfer_id,
            "sim_tokens": seq.prompt_tokens,
        }
        return PrefillResult(
            kv_transfer_params=params,
            prompt_tokens=seq.prompt_tokens,
            transferred_bytes=nbytes,
            cached_tokens=seq.cached_tokens,
        )

    async def complete(self, req: EngineRequest) -> dict[str, Any]:
        return await collect_completion(self.stream(req), req.kind, self.model_name)

    async def stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:  # type: ignore[override]
        self._check_alive()
        seq = await self._submit(req, prefill_only=False)

        def usage(n: int) -> dict[str, Any]:
            return {
                "prompt_tokens": seq.prompt_tokens,
                "completion_tokens": n,
                "total_tokens": seq.prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": seq.cached_tokens},
            }

        chunks = openai_chunks(req, self.model_name, self.natural_output_tokens, self._tokens(seq), usage)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            if not seq.ended:  # the consumer went away (client disconnect): vLLM aborts the request
                self._abort(seq)

    async def observe(self) -> EngineObservation:
        if self._dead:
            return EngineObservation(
                healthy=False, kv_capacity_tokens=self.kv_capacity_tokens, error="simulated engine is down"
            )
        return EngineObservation(
            healthy=True,
            kv_usage_frac=self.kv_used_tokens / self.kv_capacity_tokens if self.kv_capacity_tokens else 1.0,
            kv_capacity_tokens=self.kv_capacity_tokens,
            running=len(self._running),
            waiting=len(self._waiting),
            prefix_cache_hits_tokens=float(self.prefix_cache_hits_tokens),
            prefix_cache_queries_tokens=float(self.prefix_cache_queries_tokens),
            kv_transfer_bytes=float(self.kv_transfer_bytes),
            extra={
                "kv_transfers_accepted": float(self.kv_transfers_accepted),
                "kv_transfers_sent": float(self.kv_transfers_sent),
                "prefix_cache_tokens": float(self._prefix.total),
                "queued_prefill_tokens": float(self.queued_prefill_tokens),
                PROMPT_TOKENS_TOTAL: float(self.prompt_tokens_total),
                EXTERNAL_HITS_TOTAL: float(self.external_prefix_cache_hits_tokens),
                ENGINE_STEPS_TOTAL: float(self.engine_steps_total),
                GENERATION_TOKENS_TOTAL: float(self.generation_tokens_total),
                **self.meter.counters(),
            },
        )

    async def release_kv(self, conversation_id: str, action: GapAction) -> KvReleased:
        """DROP: forget the conversation's cached prefix (its next request prefills its whole prompt)."""
        if action is not GapAction.DROP:
            err = ValueError if action is GapAction.KEEP else EngineError
            raise err(f"simulated engine {self.instance_id}: cannot {action} (no host-memory tier)")
        return KvReleased(conversation_id, action, f"{self._prefix.take(conversation_id)} tokens freed")

    async def aclose(self) -> None:
        for task in list(self._transfers):
            task.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None

    # ---- state ----------------------------------------------------------------------------------
    @property
    def kv_used_tokens(self) -> int:
        return sum(s.context_tokens for s in self._running)

    @property
    def queued_prefill_tokens(self) -> int:
        return sum(s.prefill_left for s in self._running) + sum(
            max(1, s.prompt_tokens - max(s.pulled, self._prefix.get(s.conversation_id)))
            for s in self._waiting
            if s.handle_tokens < 0
        )

    def cached_prefix_tokens(self, conversation_id: str) -> int:
        return self._prefix.get(conversation_id)

    # ---- internals ------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._dead:
            raise EngineError(f"engine {self.instance_id} is down (connection refused)")

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self._block) * self._block

    async def _submit(self, req: EngineRequest, prefill_only: bool) -> _Seq:
        prompt = max(1, req.prompt_tokens)
        max_out = 0 if prefill_only else requested_max(req.body, self.natural_output_tokens)
        seq = _Seq(req.request_id, req.conversation_id, prompt, max_out, self._blocks(prompt + max_out))
        params = req.kv_transfer_params
        if params and params.get("do_remote_prefill") and not prefill_only:
            transfer_id = params.get("sim_transfer_id")
            if not isinstance(transfer_id, str):
                raise EngineError(
                    f"engine {self.instance_id}: kv_transfer_params lack 'sim_transfer_id'; a simulated "
                    "decoder accepts only handles from a simulated prefiller of the same fleet."
                )
            handle = self.fabric.claim(transfer_id)
            seq.handle_tokens = handle.tokens
            seq.round_trip = handle.round_trip
            seq.source_link = handle.link
            seq.ready = False  # the KV moves once this decoder has reserved room for it (_admit)
        elif prefill_only:
            pulled = min(req.history_tokens, prompt - 1)
            if pulled > 0:  # a KV round trip: the history's KV comes from the decoder holding it
                link = self.fabric.link_of(req.history_source)
                await self.clock.sleep(handoff_time_s(pulled, self._kvb, self.link, link))
                self._check_alive()
                self.kv_transfer_bytes += pulled * self._kvb
                seq.pulled = pulled
        if prefill_only:
            seq.prefill_done = asyncio.get_running_loop().create_future()
        self._waiting.append(seq)
        self._ensure_loop()
        self._wake.set()
        return seq

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run(), name=f"sim-{self.instance_id}"
            )
            self._loop_task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A loop that crashed fails its requests (instead of leaving them waiting for ever)."""
        if task.cancelled() or task.exception() is None:
            return
        for seq in list(self._running) + list(self._waiting):
            self._fail(seq, f"engine {self.instance_id} crashed: {task.exception()!r}")
        self._running.clear()
        self._waiting.clear()
        self._reserved = 0

    async def _tokens(self, seq: _Seq) -> AsyncIterator[int]:
        """Token indices of a sequence as the engine loop emits them; raises what the engine failed with."""
        while True:
            item = await seq.out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _end(self, seq: _Seq) -> None:
        """The sequence leaves the batch: its reservation is freed, what it computed stays in the prefix
        cache (as vLLM's freed blocks do)."""
        seq.ended = True
        self._running.remove(seq)
        self._reserved -= seq.reserve
        self._prefix.put(seq.conversation_id, seq.context_tokens - seq.prefill_left)

    def _abort(self, seq: _Seq) -> None:
        """Drop a sequence nobody reads any more."""
        if seq in self._waiting:
            seq.ended = True
            self._waiting.remove(seq)
        elif seq in self._running:
            self._end(seq)
        seq.ended = True
        self._wake.set()

    def _fail(self, seq: _Seq, message: str, status: int | None = None) -> None:
        err = EngineError(message)
        if status is not None:
            err.status = status  # type: ignore[attr-defined]  # read by the router as an HTTP status
        if seq.prefill_done is not None and not seq.prefill_done.done():
            seq.prefill_done.set_exception(err)
            seq.prefill_done.exception()  # mark retrieved: the waiter may already be gone
        seq.out.put_nowait(err)

    def _admit(self) -> None:
        """Admit waiting sequences, first come first served, while a sequence slot and the KV reservation of
        the head allow (its conversation's cached prefix becomes part of it; other prefixes are evicted)."""
        while self._waiting and len(self._running) < self.max_num_seqs:
            seq = self._waiting[0]
            if seq.reserve > self.kv_capacity_tokens:
                self._waiting.popleft()
                # a request no KV cache of this engine can hold: what vLLM answers with HTTP 400 (its
                # max_model_len is at most what its KV cache holds); the engine itself is fine
                self._fail(
                    seq,
                    f"prompt of {seq.prompt_tokens} tokens does not fit in {self.instance_id}'s KV",
                    status=400,
                )
                continue
            if self._reserved + seq.reserve > self.kv_capacity_tokens:
                return  # wait for running sequences to finish (vLLM would preempt; we queue)
            self._waiting.popleft()
            own = self._prefix.take(seq.conversation_id)
            # any cached prefix may be evicted (trimmed); the conversation's own becomes part of the sequence
            self._prefix.evict(self.kv_capacity_tokens - self._reserved - seq.reserve)
            self._reserved += seq.reserve
            self._running.append(seq)
            seq.admitted = True
            if seq.handle_tokens >= 0:
                self._start_transfer(seq, own)
                continue
            self.prefix_cache_queries_tokens += seq.prompt_tokens
            # whole blocks, and the last prompt token is always computed
            hit = min(own, seq.prompt_tokens - 1) // self._block * self._block
            self.prefix_cache_hits_tokens += hit
            if seq.pulled > hit:  # the history's KV shipped in from the decoder (a round trip)
                hit = min(seq.pulled, seq.prompt_tokens - 1) // self._block * self._block
            seq.cached_tokens = hit
            seq.prefill_left = seq.prompt_tokens - hit
            self.prompt_tokens_total += hit  # the computed rest is counted chunk by chunk (_run)

    def _start_transfer(self, seq: _Seq, own: int) -> None:
        """A remote prefill's KV comes in: only what this decoder does not hold (whole blocks), over the
        slower link; the sequence joins the batch at the first step after it arrived."""
        shipped = kv_shipped_tokens(seq.handle_tokens, own, self._block)
        prompt_for_round_trip = seq.handle_tokens if seq.round_trip else 0
        dur = handoff_time_s(shipped, self._kvb, self.link, seq.source_link, prompt_for_round_trip)
        seq.cached_tokens = min(seq.handle_tokens, seq.prompt_tokens)
        seq.prefill_left = seq.prompt_tokens - seq.cached_tokens
        self.external_prefix_cache_hits_tokens += seq.cached_tokens
        self.prompt_tokens_total += seq.cached_tokens
        self.kv_transfers_accepted += 1
        self.kv_transfer_bytes += shipped * self._kvb

        async def arrive() -> None:
            await self.clock.sleep(dur)
            seq.ready = True
            self._wake.set()

        task = asyncio.get_running_loop().create_task(arrive(), name=f"sim-{self.instance_id}-kv")
        self._transfers.add(task)
        task.add_done_callback(self._transfers.discard)

    async def _run(self) -> None:
        while True:
            tm = self.tier_model  # read per step: a power cap set meanwhile applies from this step on
            self._admit()
            decoders = [s for s in self._running if s.ready and s.prefill_left == 0]
            prefilling = [s for s in self._running if s.ready and s.prefill_left > 0]
            nd = len(decoders)
            sizes = plan_chunks(self.max_batched_tokens, nd, [s.prefill_left for s in prefilling])
            chunks = list(zip(prefilling, sizes, strict=False))
            if not chunks and not nd:
                self._wake.clear()
                await self._wake.wait()
                continue
            ctx = sum(s.context_tokens for s in decoders)
            if chunks:
                work = [(n, s.prompt_tokens - s.prefill_left) for s, n in chunks]
                step_s = prefill_step_time_s(tm, work, nd, ctx)
                power_w = prefill_step_power_w(tm, work, nd, ctx)
            else:
                step_s = tm.decode_step_time_s(nd, ctx)
                power_w = tm.step_power_w(0, nd, ctx)
            self.meter.start(step_s, power_w)
            done = False
            try:
                await self.clock.sleep(step_s)
                done = True
            finally:  # a killed engine drew the step up to now
                self.meter.end(done)
            if self._dead:
                return
            self.engine_steps_total += 1
            finished: list[_Seq] = []
            for seq, n in chunks:
                self.prompt_tokens_total += n  # computed in this step (aborted or not)
                if seq.ended:  # aborted during the step
                    continue
                seq.prefill_left -= n
                if seq.prefill_left == 0:
                    if seq.max_out == 0:
                        finished.append(seq)
                        assert seq.prefill_done is not None
                        if not seq.prefill_done.done():
                            seq.prefill_done.set_result(None)
                    else:
                        self._emit(seq, finished)  # the prefill step yields the first token
            for seq in decoders:
                if not seq.ended:
                    self._emit(seq, finished)
            for seq in finished:
                self._end(seq)
                if seq.max_out > 0:
                    seq.out.put_nowait(_END)

    def _emit(self, seq: _Seq, finished: list[_Seq]) -> None:
        seq.produced += 1
        self.generation_tokens_total += 1
        seq.out.put_nowait(seq.produced)
        if seq.produced >= seq.max_out:
            finished.append(seq)
