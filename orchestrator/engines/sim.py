"""A simulated engine that serves in wall time from a tier model, so `orchestrator serve` runs with no GPU.

It implements the Engine protocol (orchestrator/engines/base.py) the way a vLLM server behaves, at the pace
the tier model (tiers/perf.py) predicts:

- continuous batching in one asyncio task per engine: every step admits waiting requests while KV and
  ``max_num_seqs`` allow, prefills up to ``max_batched_tokens`` prompt tokens (chunked prefill) together with
  one decode token for every running sequence, and lasts ``TierModel.step_time_s(...)`` (divided by the
  speed-up factor, so tests can run the same schedule faster than real time);
- KV occupancy and queues exposed like vLLM's /metrics (``EngineObservation``);
- a prefix cache per conversation (LRU, bounded by free KV): a later turn prefills only its increment;
- the remote-decode protocol: ``prefill()`` returns ``kv_transfer_params`` that a decoder accepts once
  (through a shared :class:`SimKvFabric`), paying the modelled KV-transfer time, and counts the transfer;
  a prefill request with ``history_tokens`` (a KV round trip) pulls that history's KV first, paying the same
  modelled transfer time, and computes only the rest.

The generated text is synthetic and says so (``"[simulated] token token ..."``). A request that offers
``tools`` (and no ``tool_choice: "none"``) gets a synthetic tool call (finish_reason ``tool_calls``), the
shape of an agent's intermediate turn; otherwise a turn ends with ``stop`` after ``natural_output_tokens``
tokens (or vLLM's ``min_tokens`` when it is larger: a replayed trace's output length), or ``length`` if
``max_tokens`` is smaller.

Must not import fastapi, sqlalchemy or httpx. Time comes from an injected clock (conserve/clock.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from conserve.clock import Clock, SystemClock
from energy.meters import (
    ENGINE_STEPS_TOTAL,
    EXTERNAL_HITS_TOTAL,
    GENERATION_TOKENS_TOTAL,
    PROMPT_TOKENS_TOTAL,
)
from orchestrator.core.turns import kv_shipped_tokens
from orchestrator.engines.base import EngineObservation, EngineRequest, PrefillResult, RequestKind, Wire
from orchestrator.engines.sse import sse_from_chunks
from orchestrator.errors import EngineError
from placement.base import Role
from tiers.perf import TierModel

__all__ = ["SimClock", "WallClock", "SimKvFabric", "SimEngine", "kv_transfer_time_s", "SIM_TEXT_PREFIX"]

SIM_TEXT_PREFIX = "[simulated]"

# KV transfer cost between two A40 nodes measured by the ConServe artifact
# (shared/data/conserve/cost_model_constants.csv): flat 4.849 ms up to 1,024 tokens, then
# 5.27 ms + 0.985 us/token.
_KV_LOW_CONST_S = 4.849e-3
_KV_KNEE_TOKENS = 1024
_KV_HIGH_OFFSET_S = 5.27e-3
_KV_HIGH_SLOPE_S_PER_TOKEN = 0.985e-6

# Output length of a turn that the client does not cap: the paper's SWE-bench trace decodes ~120 tokens per
# turn (DESIGN.md section 1; trace_profile_summary.csv).
DEFAULT_NATURAL_OUTPUT_TOKENS = 120


def kv_transfer_time_s(tokens: int) -> float:
    """Modelled KV-transfer latency for `tokens` tokens (A40 node measurement, see constants above)."""
    if tokens <= _KV_KNEE_TOKENS:
        return _KV_LOW_CONST_S
    return _KV_HIGH_OFFSET_S + _KV_HIGH_SLOPE_S_PER_TOKEN * tokens


# The engine's clock is the project's one (conserve/clock.py); the engine only sleeps on it. A
# SystemClock(speedup) makes a modelled second last 1/speedup real seconds.
SimClock = Clock
WallClock = SystemClock


@dataclass(slots=True)
class _Handle:
    source: str
    conversation_id: str
    tokens: int
    claimed: bool = False


class SimKvFabric:
    """The 'network' between simulated engines: a prefiller registers a KV handle, one decoder claims it."""

    def __init__(self) -> None:
        self._handles: dict[str, _Handle] = {}
        self._ids = itertools.count(1)

    def register(self, source: str, conversation_id: str, tokens: int) -> str:
        transfer_id = f"{source}-xfer-{next(self._ids)}"
        self._handles[transfer_id] = _Handle(source, conversation_id, tokens)
        return transfer_id

    def claim(self, transfer_id: str) -> _Handle:
        handle = self._handles.pop(transfer_id, None)
        if handle is None:
            raise EngineError(
                f"KV transfer {transfer_id!r} is unknown or was already claimed. "
                "To fix: forward the kv_transfer_params of a fresh prefill() exactly once."
            )
        handle.claimed = True
        return handle

    @property
    def pending(self) -> int:
        return len(self._handles)


_END = object()


@dataclass(slots=True, eq=False)
class _Seq:
    req_id: str
    conversation_id: str
    prompt_tokens: int
    cached_tokens: int  # prompt tokens already in KV (prefix cache hit or transferred)
    prefill_left: int
    max_out: int  # 0: prefill only (remote decode)
    out: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    produced: int = 0
    prefill_done: asyncio.Future[None] | None = None
    ended: bool = False  # finished or aborted: out of the batch

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.produced


class SimEngine:
    """An Engine whose timing comes from a TierModel; see the module docstring."""

    wire = Wire.CHUNKS  # in-process: the router reads stream()'s chunk dicts

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
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.natural_output_tokens = natural_output_tokens
        self.kv_capacity_tokens = tier_model.kv_capacity_tokens
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._prefix: OrderedDict[str, int] = OrderedDict()  # conversation -> tokens cached (LRU order)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
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
        self._prefix.clear()
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None

    def revive(self) -> None:
        self._dead = False

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
        transfer_id = self.fabric.register(self.instance_id, req.conversation_id, seq.prompt_tokens)
        self.kv_transfers_sent += 1
        nbytes = seq.prompt_tokens * self.tier_model.model.kv_bytes_per_token
        block = self.tier_model.block_size_tokens
        params = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.instance_id,
            "remote_block_ids": list(range(-(-seq.prompt_tokens // block))),
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
        parts: list[str] = []
        tool_args: list[str] = []
        tool_head: dict[str, Any] | None = None
        finish: str | None = None
        usage: dict[str, Any] | None = None
        rid = created = None
        async for chunk in self.stream(req):
            rid, created = chunk["id"], chunk["created"]
            if chunk.get("usage"):
                usage = chunk["usage"]
            for ch in chunk["choices"]:
                finish = ch.get("finish_reason") or finish
                if req.kind is RequestKind.COMPLETION:
                    parts.append(ch.get("text", ""))
                    continue
                delta = ch.get("delta", {})
                parts.append(delta.get("content") or "")
                for tc in delta.get("tool_calls") or ():
                    if "id" in tc:
                        tool_head = {"id": tc["id"], "type": "function", "name": tc["function"]["name"]}
                    tool_args.append(tc["function"].get("arguments", ""))
        text = "".join(parts)
        if req.kind is RequestKind.COMPLETION:
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
            "model": self.model_name,
            "choices": [choice],
            "usage": usage,
        }

    async def stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:  # type: ignore[override]
        self._check_alive()
        chat = req.kind is RequestKind.CHAT
        rid = ("chatcmpl-" if chat else "cmpl-") + req.request_id
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        tool = _tool_to_call(req.body) if chat else None
        seq = await self._submit(req, prefill_only=False)

        def chunk(delta_or_text: Any, finish: str | None = None) -> dict[str, Any]:
            ch: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                ch["delta"] = delta_or_text
            else:
                ch["text"] = delta_or_text
            return {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [ch]}

        n = 0
        call_id = f"call_{req.request_id}"
        try:
            async for _ in self._tokens(seq):
                n += 1
                last = n == seq.max_out
                if tool is not None:
                    piece = ('{"note": "' + SIM_TEXT_PREFIX) if n == 1 else " token"
                    if last:
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
        finally:
            if not seq.ended:  # the consumer went away (client disconnect): vLLM aborts the request
                self._abort(seq)
        if tool is not None:
            finish = "tool_calls"
        else:
            natural = _natural_output(req.body, self.natural_output_tokens)
            capped = _requested_max(req.body, self.natural_output_tokens) < natural
            finish = "length" if capped else "stop"
        yield chunk({} if chat else "", finish)
        yield {
            "id": rid,
            "object": obj,
            "created": created,
            "model": self.model_name,
            "choices": [],
            "usage": {
                "prompt_tokens": seq.prompt_tokens,
                "completion_tokens": n,
                "total_tokens": seq.prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": seq.cached_tokens},
            },
        }

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
                "prefix_cache_tokens": float(sum(self._prefix.values())),
                "queued_prefill_tokens": float(self.queued_prefill_tokens),
                PROMPT_TOKENS_TOTAL: float(self.prompt_tokens_total),
                EXTERNAL_HITS_TOTAL: float(self.external_prefix_cache_hits_tokens),
                ENGINE_STEPS_TOTAL: float(self.engine_steps_total),
                GENERATION_TOKENS_TOTAL: float(self.generation_tokens_total),
            },
        )

    async def observe_shared(self) -> EngineObservation:
        return await self.observe()  # computed from memory: nothing to share

    def stream_raw(self, req: EngineRequest) -> AsyncIterator[bytes]:
        return sse_from_chunks(self.stream(req))

    async def aclose(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None

    # ---- state ----------------------------------------------------------------------------------
    @property
    def kv_used_tokens(self) -> int:
        return sum(s.context_tokens for s in self._running)

    @property
    def queued_prefill_tokens(self) -> int:
        return sum(s.prefill_left for s in self._running) + sum(s.prefill_left for s in self._waiting)

    def cached_prefix_tokens(self, conversation_id: str) -> int:
        return self._prefix.get(conversation_id, 0)

    # ---- internals ------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._dead:
            raise EngineError(f"engine {self.instance_id} is down (connection refused)")

    async def _submit(self, req: EngineRequest, prefill_only: bool) -> _Seq:
        prompt = max(1, req.prompt_tokens)
        cached = 0
        params = req.kv_transfer_params
        if params and params.get("do_remote_prefill") and not prefill_only:
            transfer_id = params.get("sim_transfer_id")
            if not isinstance(transfer_id, str):
                raise EngineError(
                    f"engine {self.instance_id}: kv_transfer_params lack 'sim_transfer_id'; a simulated "
                    "decoder "
                    "accepts only handles from a simulated prefiller of the same fleet."
                )
            handle = self.fabric.claim(transfer_id)
            # only the KV this decoder does not hold already travels (its prefix cache of the conversation,
            # whole blocks: orchestrator.core.turns.kv_shipped_tokens, as in the simulator)
            own = self._prefix.get(req.conversation_id, 0)
            shipped = kv_shipped_tokens(handle.tokens, own, self.tier_model.block_size_tokens)
            await self.clock.sleep(kv_transfer_time_s(shipped))
            self._check_alive()
            cached = min(handle.tokens, prompt)
            self.external_prefix_cache_hits_tokens += cached
            self.kv_transfers_accepted += 1
            self.kv_transfer_bytes += shipped * self.tier_model.model.kv_bytes_per_token
        else:
            hit = min(self._prefix.get(req.conversation_id, 0), prompt - 1)  # last token is always computed
            self.prefix_cache_queries_tokens += prompt
            self.prefix_cache_hits_tokens += max(0, hit)
            cached = max(0, hit)
            pulled = min(req.history_tokens, prompt - 1) if prefill_only else 0
            if pulled > cached:  # a KV round trip: the history's KV comes from the decoder holding it
                await self.clock.sleep(kv_transfer_time_s(pulled))
                self._check_alive()
                self.kv_transfer_bytes += pulled * self.tier_model.model.kv_bytes_per_token
                cached = pulled
        self._prefix.pop(req.conversation_id, None)  # in use now; re-cached when the request ends
        max_out = 0 if prefill_only else _requested_max(req.body, self.natural_output_tokens)
        seq = _Seq(
            req_id=req.request_id,
            conversation_id=req.conversation_id,
            prompt_tokens=prompt,
            cached_tokens=cached,
            prefill_left=prompt - cached,
            max_out=max_out,
        )
        if prefill_only:
            seq.prefill_done = asyncio.get_running_loop().create_future()
        self.prompt_tokens_total += cached  # the computed rest is counted chunk by chunk (_run)
        self._waiting.append(seq)
        self._ensure_loop()
        self._wake.set()
        return seq

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run(), name=f"sim-{self.instance_id}"
            )

    async def _tokens(self, seq: _Seq) -> AsyncIterator[int]:
        """Token indices of a sequence as the engine loop emits them; raises what the engine failed with."""
        while True:
            item = await seq.out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _abort(self, seq: _Seq) -> None:
        """Drop a sequence nobody reads any more; what it computed stays in the prefix cache (as vLLM's
        freed blocks do)."""
        seq.ended = True
        if seq in self._waiting:
            self._waiting.remove(seq)
        elif seq in self._running:
            self._running.remove(seq)
            self._prefix[seq.conversation_id] = seq.context_tokens - seq.prefill_left
            self._prefix.move_to_end(seq.conversation_id)
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
        while self._waiting and len(self._running) < self.max_num_seqs:
            seq = self._waiting[0]
            need = seq.prompt_tokens + seq.max_out
            if need > self.kv_capacity_tokens:
                self._waiting.popleft()
                # a request no KV cache of this engine can hold: what vLLM answers with HTTP 400 (its
                # max_model_len is at most what its KV cache holds); the engine itself is fine
                self._fail(
                    seq,
                    f"prompt of {seq.prompt_tokens} tokens does not fit in {self.instance_id}'s KV",
                    status=400,
                )
                continue
            free = self.kv_capacity_tokens - self.kv_used_tokens
            while free - sum(self._prefix.values()) < need and self._prefix:
                self._prefix.popitem(last=False)  # evict the least recently used conversation prefix
            if free < need and self._running:
                return  # wait for running sequences to finish (vLLM would preempt; we queue)
            self._waiting.popleft()
            self._running.append(seq)

    async def _run(self) -> None:
        while True:
            self._admit()
            if not self._running:
                self._wake.clear()
                if self._waiting:
                    continue
                await self._wake.wait()
                continue
            budget = self.max_batched_tokens
            prefill_tokens = prefill_cached = 0
            chunks: list[tuple[_Seq, int]] = []
            decoders: list[_Seq] = []
            for seq in self._running:
                if seq.prefill_left > 0:
                    if budget <= 0:
                        continue
                    n = min(seq.prefill_left, budget)
                    budget -= n
                    if not chunks:
                        prefill_cached = seq.prompt_tokens - seq.prefill_left
                    prefill_tokens += n
                    chunks.append((seq, n))
                else:
                    decoders.append(seq)
            ctx = sum(s.context_tokens for s in decoders)
            step_s = self.tier_model.step_time_s(prefill_tokens, prefill_cached, len(decoders), ctx)
            await self.clock.sleep(step_s)
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
                seq.ended = True
                self._running.remove(seq)
                if seq.max_out > 0:
                    seq.out.put_nowait(_END)
                self._prefix[seq.conversation_id] = seq.context_tokens
                self._prefix.move_to_end(seq.conversation_id)

    def _emit(self, seq: _Seq, finished: list[_Seq]) -> None:
        seq.produced += 1
        self.generation_tokens_total += 1
        seq.out.put_nowait(seq.produced)
        if seq.produced >= seq.max_out:
            finished.append(seq)


def _natural_output(body: dict[str, Any], natural: int) -> int:
    """Where the simulated model would stop by itself: the engine's natural length, or later when the client
    asks for at least ``min_tokens`` (vLLM's sampling parameter: no end of sequence before that many)."""
    lo = body.get("min_tokens")
    if isinstance(lo, int) and not isinstance(lo, bool) and lo > natural:
        return lo
    return natural


def _requested_max(body: dict[str, Any], natural: int) -> int:
    """Output tokens this turn decodes: the client's cap, or the model's natural length (see
    :func:`_natural_output`)."""
    natural = _natural_output(body, natural)
    cap = body.get("max_completion_tokens")
    if cap is None:
        cap = body.get("max_tokens")
    if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1:
        return min(cap, natural)
    return natural


def _tool_to_call(body: dict[str, Any]) -> str | None:
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
