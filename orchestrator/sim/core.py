"""Discrete-event simulator of a serving fleet in virtual time, driving the same policy objects as the router.

Model (DESIGN.md section 6), per engine instance, vLLM-like:
- Continuous batching with chunked prefill: each step decodes one token for every running decode sequence and
  spends the rest of a token budget (``max_batched_tokens``) on prefill chunks, first come first served;
  at most ``max_seqs`` sequences run at once. The step time is the tier model's ``step_time_s``.
- KV capacity and admission: a sequence is admitted (FCFS, head-of-line) only when its whole footprint
  (prompt + output tokens, block-rounded) fits next to the admitted ones after evicting unpinned prefix-cache
  entries; otherwise it waits. Nothing is dropped and nothing is preempted. (vLLM allocates blocks lazily and
  preempts on overflow; reserving the footprint avoids modelling recomputation: a documented simplification.)
- Prefix cache: when a turn ends its KV (prompt + output) stays cached on its instance, unpinned, evicted LRU
  (whole or trimmed entries) only when an admission needs the room. A later turn of the same conversation hits
  it at block granularity (at least one token is always recomputed, as vLLM does).
- Disaggregated prefill: the prefiller computes the prompt (from its own prefix cache where it can), then the
  decoder allocates the KV (admission), the KV not already cached on the decoder is transferred over the link
  (``tiers.links.kv_transfer_time_s``; transfers do not contend) and the prefiller frees its copy, which stays
  in its prefix cache. The decoder emits the first token at its next step.
- Energy: each step draws ``step_power_w`` (prefill or decode phase) for its duration; an instance with no
  step running draws ``idle_w``. Every instance is billed until the last conversation ends (makespan).

Speed: between events that change an instance's batch (a sequence finishing, one joining, a prefill chunk),
decode steps differ only by context growth (one token per sequence per step), so a whole stretch of n steps is
scheduled as one event with the closed-form sum n*A + D*n(n-1)/2 (A = first step, D = per-step growth,
linear in context as the tier model is). An event that reaches a busy instance truncates its stretch to the
step in progress. Per-sequence progress is implicit: a decoding sequence knows the instance step at which it
emits its first and its last token, so committing a stretch costs O(log batch), never O(batch) or O(tokens).

Observables for the policies (``FleetView``) are refreshed whenever an instance's batch composition changes,
like a metrics scrape; they never include a sequence's future (its output length). Views, pins, the meaning
of every Placement field, admission reservations and the per-conversation summary come from the driver core
(orchestrator/core/), shared with the live router: KV used is the larger of the resident KV and the driver's
own accounting (its pinned conversations' tokens, its reservations), capped at capacity.

Nothing here reads the wall clock except ``wall_s`` in the result (run time, for benchmarks). No module or
class state: every run builds its own objects.
"""

from __future__ import annotations

import bisect
import gc
import heapq
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from orchestrator.core import (
    AdmissionRule,
    PinBook,
    PinState,
    Reserve,
    final_turn_times,
    growth_tokens,
    has_room,
    instance_view,
    kv_shipped_tokens,
    moves_pin,
    reservation_tokens,
    round_trip_tokens,
    rule_for,
)
from orchestrator.errors import SimulationError
from orchestrator.sim.clock import VirtualClock
from orchestrator.sim.result import (
    ConversationRecord,
    Decision,
    EnergyWindow,
    Feedback,
    InstanceEnergy,
    SimResult,
    TurnRecord,
    WindowWork,
)
from orchestrator.workload import ConversationSpec
from placement.base import FleetView, InstanceView, Placement, Policy, Role, TurnRequest
from placement.errors import PlacementError
from tiers.connector import kv_bookkeeping_s
from tiers.links import kv_transfer_time_s
from tiers.perf import TierModel
from tiers.serving import with_serving_overhead

# vLLM's default block size (16 tokens) and a common chunked-prefill budget; both configurable per run.
DEFAULT_MAX_BATCHED_TOKENS = 8192
DEFAULT_MAX_SEQS = 256

# KV bookkeeping of a per-turn KV round trip (Placement.history_tokens): identifying, packing and appending
# the blocks on both sides. One home for the constants: tiers.connector (the ConServe artifact's AMPD
# emulation, conserve/src/per_turn_cost_model.py; shared/data/conserve/cost_model_constants.csv
# KV_MGMT_BASE_MS = 2.0 ms and KV_MGMT_PER_BLOCK_US = 5.0 us per 16-token block, per side, x2 sides), charged
# over history + new tokens. The name stays importable from here.
kv_round_trip_bookkeeping_s = kv_bookkeeping_s


class InstanceLike(Protocol):
    """What the simulator needs of an instance (orchestrator.fleet.InstanceSpec satisfies it)."""

    @property
    def instance_id(self) -> str: ...
    @property
    def tier(self) -> str: ...
    @property
    def role(self) -> Role: ...
    @property
    def tier_model(self) -> TierModel: ...


class TurnDelay(Protocol):
    """A wait the driver inserts before a later turn is placed (an emulated client-side delay, e.g. the
    ConServe artifact's AMPD emulation, orchestrator.artifact.AmpdEmulation). The turn's arrival stays when
    it was issued, so its TTFT and the conversation's TTFET count the wait."""

    def delay_s(self, conversation_id: str, turn: int, t: float) -> float:
        """Seconds turn `turn` (>= 2) of the conversation, issued at virtual time `t`, waits; called in
        event order, once per turn."""
        ...

    def conversation_offset_s(self, conversation_id: str) -> float:
        """Seconds added to the conversation's TTFET and E2E (both clocks) after the run."""
        ...


@dataclass(frozen=True, slots=True)
class SimOptions:
    max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS  # chunked-prefill token budget per step
    max_seqs: int = DEFAULT_MAX_SEQS
    prefix_cache: bool = True  # on every instance (vLLM's default)
    prefiller_prefix_cache: bool = True  # set False to model prefillers that never reuse a prefix
    record_views: bool = False  # keep the FleetView of every decision (parity test; memory-hungry)
    # token budget of prefill-role instances (None: max_batched_tokens); the paper's artifact ran its
    # prefiller with a larger budget than its decoders (orchestrator.sim.paper.PAPER_SIM_OPTIONS)
    prefill_max_batched_tokens: int | None = None
    # router-side KV admission as the paper's artifact ran it (orchestrator.sim.admission): off by default
    router_admission: bool = False
    # the resident KV policies see includes the prefix-cache entries of conversations still going (True, the
    # behaviour the fidelity tables were measured with) or only the sequences' KV, as a live engine reports it
    # (vLLM's kv_cache_usage_perc counts no evictable cached block) and the live router sees it (False: the
    # router/simulator parity test, tests/core/test_driver_parity.py). Pinned conversations count either way.
    view_cached_histories: bool = True
    # keep every inter-token gap of each conversation's final turn in its ConversationRecord
    # (last_turn_gaps_s), for the per-token last-turn TBT statistic the paper reports
    # (orchestrator.artifact.pooled_token_slowdowns; s5_metrics.py lines 587-599). Off by default: memory
    # grows with the final turns' output tokens. Changes no simulated figure.
    record_tbt_gaps: bool = False
    # the serving path's per-step overhead over the offline decode grid the tier model is fitted to
    # (tiers.serving: +1.17 ms per decode step with >= 2 running requests, measured on the paper's A40
    # `vllm serve` engines, shared/data/conserve/interference_cell_wall.csv); off by default
    serving_step_overhead: bool = False
    # the online power controller (orchestrator.sim.power.SimPowerControl; issue 14 item 3): every few
    # virtual seconds it moves each pool's power cap; None: every instance keeps its configured cap
    power_controller: Any = None

    def __post_init__(self) -> None:
        for name in ("max_batched_tokens", "max_seqs", "prefill_max_batched_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise SimulationError(f"SimOptions.{name} must be >= 1, got {v}")

    def budget_for(self, role: Role) -> int:
        if role == Role.PREFILL and self.prefill_max_batched_tokens is not None:
            return self.prefill_max_batched_tokens
        return self.max_batched_tokens


# sequence states: waiting, prefilling, held (prefill done, KV kept until transferred), in transfer,
# joining (KV arrived, joins the batch at the next step), decoding, released
_W, _P, _H, _T, _J, _D, _X = range(7)

# sequence kinds
_FULL = 0  # prefill locally then decode (colocated / decoder-local prefill)
_PREFILL_ONLY = 1  # remote prefill on a prefiller; KV handed to a decoder
_DECODE_ONLY = 2  # decode from KV transferred by a prefiller


class _TurnState:
    """Mutable record of one turn while it runs (frozen into a TurnRecord at the end)."""

    __slots__ = (
        "conv", "turn", "arrival_s", "input_tokens", "output_tokens", "decode_inst", "prefill_inst", "remote",
        "prefill_start_s", "prefill_end_s", "kv_admit_s", "first_token_s", "last_token_s", "cached_tokens",
        "prefilled_tokens", "transfer_tokens", "transfer_bytes", "restarts", "first_step", "last_step",
        "epoch", "seqs", "history_tokens",
    )

    def __init__(self, conv: int, turn: int, arrival_s: float, inp: int, out: int) -> None:
        self.seqs: list[_Seq] = []
        self.conv = conv
        self.turn = turn
        self.arrival_s = arrival_s
        self.input_tokens = inp
        self.output_tokens = out
        self.decode_inst = -1
        self.prefill_inst = -1
        self.remote = False
        self.prefill_start_s = math.nan
        self.prefill_end_s = math.nan
        self.kv_admit_s = math.nan
        self.first_token_s = math.nan
        self.last_token_s = math.nan
        self.cached_tokens = 0
        self.prefilled_tokens = 0
        self.transfer_tokens = 0
        self.transfer_bytes = 0
        self.restarts = 0
        self.first_step = 0
        self.last_step = 0
        self.epoch = 0  # bumped on restart; stale sequences compare and drop out
        self.history_tokens = 0  # KV shipped decoder -> prefiller before the prefill (a per-turn round trip)


class _Seq:
    __slots__ = (
        "key", "ts", "kind", "cid", "reserve", "prefill_total", "prefill_done", "cached", "ctx_entry",
        "entry_step", "last_step", "partner", "admitted", "epoch", "queued_estimate", "inst", "state",
        "pulled",
    )

    def __init__(self, key: int, ts: _TurnState, kind: int, cid: str) -> None:
        self.key = key
        self.ts = ts
        self.kind = kind
        self.cid = cid
        self.reserve = 0
        self.prefill_total = 0
        self.prefill_done = 0
        self.cached = 0
        self.ctx_entry = 0
        self.entry_step = 0
        self.last_step = 0
        self.partner: _Seq | None = None  # prefill-only <-> decode-only pair
        self.admitted = False
        self.epoch = ts.epoch
        self.queued_estimate = 0
        self.inst = -1
        self.state = _X
        self.pulled = 0  # prompt tokens whose KV was shipped in before the prefill (counts as cached)
        ts.seqs.append(self)


class _Instance:
    __slots__ = (
        "idx", "id", "tier", "role", "tm", "cap", "block", "max_seqs", "budget", "healthy", "cache_on",
        "waiting", "prefilling", "heap", "n_decode", "ctx_sum", "pending_join", "reserved", "nondecode_kv",
        "cache", "cache_total", "steps_done", "busy", "cur", "version", "segments", "prefill_log",
        "queued_prefill", "running_other", "pinned", "view", "dirty", "peak_reserved", "kvb", "link",
        "prefill_tokens", "decode_tokens", "live", "live_total", "adm_used", "pinned_tokens", "view_live",
        "tbt_gap_token_s", "tbt_tokens",
    )

    def __init__(self, idx: int, spec: InstanceLike, opts: SimOptions, link: str) -> None:
        self.idx = idx
        self.id = spec.instance_id
        self.tier = spec.tier
        self.role = Role(spec.role)
        self.tm: TierModel = (
            with_serving_overhead(spec.tier_model) if opts.serving_step_overhead else spec.tier_model
        )
        self.cap = int(self.tm.kv_capacity_tokens)
        self.block = int(self.tm.block_size_tokens)
        self.kvb = int(self.tm.model.kv_bytes_per_token)
        self.max_seqs = opts.max_seqs
        self.budget = opts.budget_for(self.role)
        self.healthy = True
        self.cache_on = opts.prefix_cache and (opts.prefiller_prefix_cache or self.role != Role.PREFILL)
        self.link = link
        self.waiting: deque[_Seq] = deque()
        self.prefilling: list[_Seq] = []
        self.heap: list[tuple[int, int, _Seq]] = []  # (last_step, key, seq) of decoding sequences
        self.n_decode = 0
        self.ctx_sum = 0  # context tokens of decoding sequences as of steps_done
        self.pending_join: list[_Seq] = []
        self.reserved = 0
        self.nondecode_kv = 0
        self.cache: OrderedDict[str, int] = OrderedDict()
        self.cache_total = 0
        # cached prefixes of conversations that are still going (the router's own accounting of what its
        # pinned conversations hold on this instance between turns, DESIGN.md section 7)
        self.live: dict[str, int] = {}
        self.live_total = 0
        self.view_live = opts.view_cached_histories  # count them in the view (SimOptions)
        self.steps_done = 0
        self.busy = False
        # current step or stretch: (t_start, n, A, D, power_w, is_prefill, chunks)
        self.cur: tuple[float, int, float, float, float, bool, list[tuple[_Seq, int]]] | None = None
        self.version = 0
        # committed segments: (t_start, t_end, n_steps, A, D, power_w, step0)
        self.segments: list[tuple[float, float, int, float, float, float, int]] = []
        self.prefill_log: list[tuple[float, float, _TurnState, int]] = []  # (step start, end, turn, tokens)
        self.queued_prefill = 0
        self.running_other = 0  # admitted decode-only sequences waiting for their KV
        self.pinned: set[str] = set()  # conversations pinned here (orchestrator.core.PinBook)
        self.view: InstanceView | None = None
        self.dirty = True
        self.peak_reserved = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.adm_used = 0  # router-side KV reservations on this instance (SimOptions.router_admission)
        # the driver's accounting of its pins (orchestrator.core.PinBook, as the router's): the KV tokens the
        # conversations pinned here hold (prompt while a turn runs, prompt + output after it), whether or not
        # the engine still has them resident
        self.pinned_tokens = 0
        # sum over decode steps of step seconds x sequences decoded, and those tokens (the power
        # controller's token-weighted mean TBT, orchestrator.sim.power)
        self.tbt_gap_token_s = 0.0
        self.tbt_tokens = 0

    def cache_take(self, cid: str) -> int:
        tok = self.cache.pop(cid, 0)
        self.cache_total -= tok
        lv = self.live.pop(cid, 0)
        self.live_total -= lv
        return tok

    def cache_put(self, cid: str, tokens: int, live: bool) -> None:
        self.cache_take(cid)
        self.cache[cid] = tokens
        self.cache_total += tokens
        if live:
            self.live[cid] = tokens
            self.live_total += tokens

    def cache_evict(self, need_free: int) -> None:
        """Evict LRU entries (trimming the last one) until reserved + cache + need_free <= capacity."""
        while self.cache and self.reserved + need_free + self.cache_total > self.cap:
            cid, tok = self.cache.popitem(last=False)
            over = self.reserved + need_free + self.cache_total - self.cap
            lv = self.live.pop(cid, 0)
            self.live_total -= lv
            if tok > over:  # trim the entry's tail, keep its prefix
                self.cache[cid] = tok - over
                self.cache.move_to_end(cid, last=False)
                self.cache_total -= over
                if lv:
                    self.live[cid] = tok - over
                    self.live_total += tok - over
            else:
                self.cache_total -= tok

    def block_round(self, tokens: int) -> int:
        b = self.block
        return -(-tokens // b) * b

    def make_view(self) -> InstanceView:
        if self.dirty or self.view is None:
            # resident: running sequences' KV and (SimOptions.view_cached_histories) the cached prefixes of
            # conversations still going
            resident = self.ctx_sum + self.nondecode_kv + (self.live_total if self.view_live else 0)
            self.view = instance_view(
                self.id,
                self.role,
                self.tier,
                healthy=self.healthy,
                queued_prefill_tokens=self.queued_prefill,
                resident_kv_tokens=resident,
                pinned_kv_tokens=self.pinned_tokens,
                reserved_kv_tokens=self.adm_used,
                kv_capacity_tokens=self.cap,
                running_seqs=len(self.prefilling) + self.n_decode,
                waiting_seqs=len(self.waiting),
                pinned_conversations=len(self.pinned),
            )
            self.dirty = False
        return self.view


def _cum(m: int, a: float, d: float) -> float:
    return m * a + d * m * (m - 1) * 0.5


def _steps_by(elapsed: float, a: float, d: float, n: int) -> int:
    """Largest m in [0, n] with cum(m) <= elapsed."""
    if elapsed <= 0:
        return 0
    if abs(d) < 1e-15:
        m = int(elapsed / a) if a > 0 else n
    else:
        b = a - d / 2
        disc = b * b + 2 * d * elapsed
        m = int((-b + math.sqrt(max(disc, 0.0))) / d) if disc >= 0 else n
    m = max(0, min(n, m))
    while m < n and _cum(m + 1, a, d) <= elapsed:
        m += 1
    while m > 0 and _cum(m, a, d) > elapsed:
        m -= 1
    return m


_ARRIVE = 0
_STEP = 1
_XFER = 2
_FAIL = 3
_PULL = 4
_RESUME = 5
_POWER = 6


class _Sim:
    def __init__(
        self,
        instances: Sequence[InstanceLike],
        conversations: Sequence[ConversationSpec],
        policy: Policy,
        seed: int,
        opts: SimOptions,
        links: Mapping[str, str] | None,
        failures: Sequence[tuple[str, float]],
        progress: Callable[[int, int], None] | None,
        turn_delay: TurnDelay | None = None,
    ) -> None:
        if not instances:
            raise SimulationError("no instances to simulate. To fix: give the fleet at least one instance.")
        ids = [i.instance_id for i in instances]
        if len(set(ids)) != len(ids):
            raise SimulationError(f"instance ids must be unique, got {ids}")
        cids = [c.conversation_id for c in conversations]
        if len(set(cids)) != len(cids):
            raise SimulationError("conversation ids must be unique. To fix: deduplicate the workload.")
        for c in conversations:
            if not c.turns:
                raise SimulationError(f"conversation {c.conversation_id!r} has no turns")
            if not math.isfinite(c.arrival_s) or c.arrival_s < 0:
                raise SimulationError(f"conversation {c.conversation_id!r}: arrival_s must be >= 0")
        self.opts = opts
        self.turn_delay = turn_delay
        self.insts = [
            _Instance(k, s, opts, (links or {}).get(s.tier, "pcie")) for k, s in enumerate(instances)
        ]
        self.by_id = {inst.id: inst for inst in self.insts}
        self.convs = list(conversations)
        self.policy = policy
        self.seed = seed
        self.clock = VirtualClock()
        self.heap: list[tuple[float, int, int, Any, Any]] = []
        self.order = 0
        self.calls = 0
        self.key = 0
        # pins and the tokens counted on them (orchestrator.core.PinBook; book.pins is FleetView.pins)
        self.book = PinBook(self.by_id)
        self.pins = self.book.pins
        self.pin_state = [PinState(c.conversation_id) for c in self.convs]
        self.decisions: list[Decision] = []
        self.feedback: list[Feedback] = []
        self.turn_states: list[list[_TurnState]] = [[] for _ in self.convs]
        self.inputs: list[list[int]] = []
        for c in self.convs:
            if c.turns[0].appended_tokens < 1:
                raise SimulationError(
                    f"conversation {c.conversation_id!r}: turn 1 needs a prompt of >= 1 token"
                )
            acc, ins = 0, []
            for k, t in enumerate(c.turns):
                acc += t.appended_tokens
                ins.append(acc)
                acc += t.output_tokens
                if t.output_tokens < 1:
                    raise SimulationError(
                        f"conversation {c.conversation_id!r} turn {k + 1}: output_tokens must be >= 1"
                    )
            self.inputs.append(ins)
        self.done = 0
        self.progress = progress
        self.events = 0
        self.kv_transfers = 0
        self.kv_transfer_bytes = 0
        self.views: list[InstanceView] = [i.make_view() for i in self.insts]
        # router-side KV admission (orchestrator.sim.admission); None: conversations are placed on arrival
        self.rule: AdmissionRule = rule_for(policy.name)
        self.admission = opts.router_admission
        self.admitted_s = [math.nan] * len(self.convs)
        self.adm_dec: list[tuple[int, int] | None] = [None] * len(self.convs)  # (instance, tokens) held
        self.adm_pre: list[tuple[int, int] | None] = [None] * len(self.convs)
        self.adm_waiting: list[_TurnState] = []  # turns waiting for room, in arrival order
        self.adm_parked: list[tuple[_TurnState, Placement]] = []  # placed; the chosen engine has no room yet
        self.adm_parked_count = 0
        if self.admission:
            caps = [i.cap for i in self.insts if i.role.can_decode]
            for ci, c in enumerate(self.convs):
                need = max(self._adm_need(ci, k + 1)[0] for k in range(len(c.turns)))
                if caps and need > max(caps):
                    raise SimulationError(
                        f"conversation {c.conversation_id!r} needs a router-side KV reservation of {need} "
                        f"tokens but the largest decode-capable instance holds {max(caps)}; it would wait "
                        "forever. To fix: cap the turns (--max-turns) or turn router admission off."
                    )
        for inst_id, t in failures:
            if inst_id not in self.by_id:
                raise SimulationError(f"failure names unknown instance {inst_id!r}; instances: {ids}")
            self._push(t, _FAIL, self.by_id[inst_id], None)
        for ci, c in enumerate(self.convs):
            self._push(c.arrival_s, _ARRIVE, ci, 1)
        self.power: Any = None  # the power controller's driver (SimOptions.power_controller)
        if opts.power_controller is not None:
            from orchestrator.sim.power import SimPowerDriver

            self.power = SimPowerDriver(opts.power_controller, self.insts)
            self._push(opts.power_controller.interval_s, _POWER, None, None)

    # ---- event plumbing ------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, a: Any, b: Any) -> None:
        self.order += 1
        heapq.heappush(self.heap, (t, self.order, kind, a, b))

    def _next_call(self) -> int:
        self.calls += 1
        return self.calls

    def _new_seq(self, ts: _TurnState, kind: int) -> _Seq:
        self.key += 1
        return _Seq(self.key, ts, kind, self.convs[ts.conv].conversation_id)

    def run(self) -> None:
        heap = self.heap
        clock = self.clock
        while heap:
            t, _, kind, a, b = heapq.heappop(heap)
            clock.advance_to(t)
            self.events += 1
            if kind == _STEP:
                if a.healthy and b == a.version:
                    self._commit(a, t)
                    self._plan(a, t)
            elif kind == _ARRIVE:
                self._arrive(a, b, t)
            elif kind == _XFER:
                self._xfer_done(a, t)
            elif kind == _PULL:
                self._pull_done(a, b, t)
            elif kind == _RESUME:
                self._arrive(a.conv, a.turn, t, a, resumed=True)
            elif kind == _POWER:
                self.power.step(self, t)
                if self.done < len(self.convs):
                    self._push(t + self.opts.power_controller.interval_s, _POWER, None, None)
            else:
                self._fail(a, t)
        if self.done != len(self.convs):
            stuck = [
                c.conversation_id for ci, c in enumerate(self.convs)
                if not self.turn_states[ci] or math.isnan(self.turn_states[ci][-1].last_token_s)
                or len(self.turn_states[ci]) < len(c.turns)
            ]
            raise SimulationError(
                f"{len(stuck)} conversation(s) never finished (e.g. {stuck[:3]}): the fleet cannot hold them "
                "(KV capacity) or every instance that could serve them failed. To fix: add decoders or "
                "reduce the per-conversation context."
            )

    # ---- arrivals and placement ----------------------------------------------------------------------
    def _fleet_view(self) -> FleetView:
        views = self.views
        for inst in self.insts:
            if inst.dirty:
                views[inst.idx] = inst.make_view()
        return FleetView(tuple(views), self.pins)

    # ---- router-side KV admission (SimOptions.router_admission; orchestrator.sim.admission) ------------
    def _adm_need(self, ci: int, turn: int) -> tuple[int, int]:
        """(decoder tokens, prefiller tokens) a turn reserves when it is admitted; (0, 0): no admission."""
        outs = [t.output_tokens for t in self.convs[ci].turns]
        return reservation_tokens(self.rule, turn, self.inputs[ci], outs)

    def _adm_open(self, ts: _TurnState) -> bool:
        """Some healthy engine has room for the reservation (then the policy is asked to place)."""
        nd, npre = self._adm_need(ts.conv, ts.turn)
        dec_ok = any(
            i.healthy and i.role.can_decode and has_room(i.cap, i.adm_used, nd) for i in self.insts
        )
        if not dec_ok or npre == 0:
            return dec_ok
        pre = [i for i in self.insts if i.healthy and i.role == Role.PREFILL]
        return not pre or any(has_room(i.cap, i.adm_used, npre) for i in pre)

    def _adm_fits(self, ts: _TurnState, pl: Placement) -> bool:
        nd, npre = self._adm_need(ts.conv, ts.turn)
        dec = self.by_id[pl.decode_instance]
        if not has_room(dec.cap, dec.adm_used, nd):
            return False
        if npre and pl.remote_prefill:
            pre = self._instance(pl.prefill_instance or "", "prefill")
            return pre.role != Role.PREFILL or has_room(pre.cap, pre.adm_used, npre)
        return True

    def _adm_hold(self, held: list[tuple[int, int] | None], ci: int, idx: int, tokens: int) -> None:
        old = held[ci]
        if old is not None:
            self.insts[old[0]].adm_used -= old[1]
            self.insts[old[0]].dirty = True
        held[ci] = (idx, tokens) if tokens else None
        if tokens:
            self.insts[idx].adm_used += tokens
            self.insts[idx].dirty = True

    def _adm_account(
        self, ts: _TurnState, pl: Placement, admitting: bool, fresh: bool, t: float
    ) -> None:
        """Reserve (admitting), grow (per-turn rule, a new later turn) or move (the decoder changed)."""
        ci = ts.conv
        dec = self.by_id[pl.decode_instance]
        if admitting:
            nd, npre = self._adm_need(ci, ts.turn)
            self._adm_hold(self.adm_dec, ci, dec.idx, nd)
            if npre and pl.remote_prefill and self.by_id[pl.prefill_instance or ""].role == Role.PREFILL:
                self._adm_hold(self.adm_pre, ci, self.by_id[pl.prefill_instance or ""].idx, npre)
            if ts.turn == 1:
                self.admitted_s[ci] = t
            return
        held = self.adm_dec[ci]
        if held is None:
            return
        tokens = held[1]
        if fresh:  # AMPD's first-turn rule: grow, never block (0 under the other rules)
            spec = self.convs[ci].turns[ts.turn - 1]
            tokens += growth_tokens(self.rule, spec.appended_tokens, spec.output_tokens)
        if tokens != held[1] or held[0] != dec.idx:
            self._adm_hold(self.adm_dec, ci, dec.idx, tokens)

    def _adm_release(self, ci: int, t: float) -> None:
        self._adm_hold(self.adm_dec, ci, 0, 0)
        self._adm_hold(self.adm_pre, ci, 0, 0)
        self._adm_retry(t)

    def _adm_retry(self, t: float) -> None:
        """Room was freed: placed turns waiting for their engine first, then waiting turns in arrival
        order, each admitted when it fits (no head-of-line blocking, like the artifact's polling clients)."""
        if self.adm_parked:
            parked, self.adm_parked = self.adm_parked, []
            for ts, pl in parked:
                if self._adm_fits(ts, pl) and self.by_id[pl.decode_instance].healthy:
                    self._adm_account(ts, pl, True, True, t)
                    self._apply(ts, pl, t)
                else:
                    self.adm_parked.append((ts, pl))
        if self.adm_waiting:
            waiting, self.adm_waiting = self.adm_waiting, []
            for ts in waiting:
                if self._adm_open(ts):
                    self._place(ts, t, admitting=True, fresh=True)
                else:
                    self.adm_waiting.append(ts)

    def _arrive(
        self, ci: int, turn: int, t: float, ts: _TurnState | None = None, resumed: bool = False
    ) -> None:
        conv = self.convs[ci]
        inp = self.inputs[ci][turn - 1]
        spec = conv.turns[turn - 1]
        fresh = ts is None or resumed
        if ts is None:
            ts = _TurnState(ci, turn, t, inp, spec.output_tokens)
            self.turn_states[ci].append(ts)
            if self.turn_delay is not None and turn > 1:
                wait = self.turn_delay.delay_s(conv.conversation_id, turn, t)
                if wait > 0:  # issued now (ts.arrival_s), placed after the wait
                    self._push(t + wait, _RESUME, ts, None)
                    return
        admitting = False
        if self.admission and fresh and self._adm_need(ci, turn)[0] > 0:
            if not self._adm_open(ts):
                self.adm_waiting.append(ts)
                return
            admitting = True
        self._place(ts, t, admitting, fresh)

    def _place(self, ts: _TurnState, t: float, admitting: bool = False, fresh: bool = True) -> None:
        """Ask the policy where the turn goes and apply it (after the router-side reservation, if any)."""
        ci, turn = ts.conv, ts.turn
        conv = self.convs[ci]
        inp = ts.input_tokens
        spec = conv.turns[turn - 1]
        new = spec.appended_tokens
        req = TurnRequest(conv.conversation_id, turn, inp, new)
        view = self._fleet_view()
        try:
            pl = self.policy.place(req, view)
        except PlacementError as err:
            raise SimulationError(
                f"policy {self.policy.name!r} could not place {conv.conversation_id!r} turn {turn} at "
                f"t={t:.3f}s: {err}"
            ) from err
        if self.opts.record_views:
            snap = FleetView(view.instances, {conv.conversation_id: self.pins[conv.conversation_id]}
                             if conv.conversation_id in self.pins else {})
            self.decisions.append(Decision(t, req, pl, snap, self._next_call()))
        else:
            self.decisions.append(Decision(t, req, pl, None, self._next_call()))
        if self.admission:
            self._instance(pl.decode_instance, "decode")
            if admitting and not self._adm_fits(ts, pl):
                self.adm_parked.append((ts, pl))  # KvTracker.wait_for_engine: hold the decision until room
                self.adm_parked_count += 1
                return
            self._adm_account(ts, pl, admitting, fresh, t)
        self._apply(ts, pl, t)

    def _instance(self, iid: str, what: str) -> _Instance:
        inst = self.by_id.get(iid)
        if inst is None:
            raise SimulationError(f"policy {self.policy.name!r} returned unknown {what} instance {iid!r}")
        if not inst.healthy:
            raise SimulationError(f"policy {self.policy.name!r} placed on unhealthy instance {iid!r}")
        return inst

    def _apply(self, ts: _TurnState, pl: Placement, t: float) -> None:
        cid = self.convs[ts.conv].conversation_id
        dec = self._instance(pl.decode_instance, "decode")
        if not dec.role.can_decode:
            raise SimulationError(
                f"policy {self.policy.name!r} chose {dec.id!r} (role {dec.role}) to decode; it cannot decode"
            )
        ci = ts.conv
        pst = self.pin_state[ci]
        if moves_pin(pl, pst.pin):
            old = self.book.pin(pst, dec.id)
            if old is not None:
                self.by_id[old].dirty = True
            dec.dirty = True
        # a placed turn is counted for its prompt (+ the client's output cap, which the simulator's turns do
        # not carry: orchestrator.core.running_turn_kv_tokens) on the pinned decoder until the turn ends
        self._pin_account(ci, ts.input_tokens)
        ts.decode_inst = dec.idx
        need = dec.block_round(ts.input_tokens + ts.output_tokens)
        if need > dec.cap:
            raise SimulationError(
                f"conversation {cid!r} turn {ts.turn} needs {need} KV tokens but {dec.id} holds {dec.cap}. "
                "To fix: cap the turns (--max-turns) or use a tier with more memory."
            )
        if pl.remote_prefill:
            pre = self._instance(pl.prefill_instance or "", "prefill")
            ts.prefill_inst = pre.idx
            ts.remote = True
            s = self._new_seq(ts, _PREFILL_ONLY)
            s.reserve = pre.block_round(ts.input_tokens)
            if s.reserve > pre.cap:
                raise SimulationError(
                    f"conversation {cid!r} turn {ts.turn}: prompt of {ts.input_tokens} tokens exceeds "
                    f"prefiller {pre.id}'s KV capacity {pre.cap}. To fix: cap turns or use a larger "
                    "prefill tier."
                )
            d = self._new_seq(ts, _DECODE_ONLY)
            d.reserve = need
            s.partner, d.partner = d, s
            hist = self._history_to_pull(ts, pl, dec, cid)
            if hist > 0:
                # KV round trip: the history's KV goes decoder -> prefiller, then the prefill of the rest
                ts.history_tokens = hist
                nbytes = hist * dec.kvb
                self.kv_transfers += 1
                self.kv_transfer_bytes += nbytes
                link = dec.link if dec.link == pre.link else _slower(dec.link, pre.link)
                s.pulled = hist
                s.inst = pre.idx
                self._push(t + kv_transfer_time_s(hist, dec.kvb, link), _PULL, s, pre)
                return
            self._enqueue(pre, s, t)
        else:
            ts.prefill_inst = dec.idx
            ts.remote = False
            s = self._new_seq(ts, _FULL)
            s.reserve = need
            self._enqueue(dec, s, t)

    def _pin_account(self, ci: int, tokens: int) -> None:
        """Set the KV tokens conversation `ci` is counted for on its pinned instance (none: no-op)."""
        iid = self.book.account(self.pin_state[ci], tokens)
        if iid is not None:
            self.by_id[iid].dirty = True

    def _unpin(self, ci: int) -> None:
        iid = self.book.unpin(self.pin_state[ci])
        if iid is not None:
            self.by_id[iid].dirty = True

    def _history_to_pull(self, ts: _TurnState, pl: Placement, dec: _Instance, cid: str) -> int:
        """History tokens a round-trip placement ships to the prefiller: what the decoder still holds of it
        (whole blocks); 0 when the placement asks for none or the decoder has lost it."""
        held = dec.cache.get(cid, 0) if dec.cache_on else 0
        new = self.convs[ts.conv].turns[ts.turn - 1].appended_tokens
        turn = TurnRequest(cid, ts.turn, ts.input_tokens, new)
        return round_trip_tokens(pl, turn, held, dec.block)

    def _pull_done(self, s: _Seq, pre: _Instance, t: float) -> None:
        """The history KV has reached the prefiller: queue the prefill of the rest there."""
        ts = s.ts
        if s.epoch != ts.epoch:
            return  # the turn was restarted after a failure
        if not pre.healthy:
            self._restart(ts, t)
            return
        self._enqueue(pre, s, t)

    # ---- instance mechanics --------------------------------------------------------------------------
    def _enqueue(self, inst: _Instance, s: _Seq, t: float) -> None:
        if s.kind != _DECODE_ONLY:
            hit = inst.cache.get(s.cid, 0) if inst.cache_on else 0
            s.queued_estimate = max(1, s.ts.input_tokens - max(hit, s.pulled))
            inst.queued_prefill += s.queued_estimate
        s.inst = inst.idx
        s.state = _W
        inst.waiting.append(s)
        inst.dirty = True
        self._wake(inst, t)

    def _wake(self, inst: _Instance, t: float) -> None:
        """Something changed at `inst`: plan now if idle, else end the current stretch at the next step."""
        if not inst.healthy:
            return
        if not inst.busy:
            self._plan(inst, t)
            return
        cur = inst.cur
        if cur is None or cur[5]:
            return  # a prefill step is a single step: the change is seen at its end
        t0, n, a, d, pw, _, _ = cur
        m = _steps_by(t - t0, a, d, n)
        new_n = min(n, m + 1)
        if new_n < n:
            inst.cur = (t0, new_n, a, d, pw, False, [])
            inst.version += 1
            self._push(t0 + _cum(new_n, a, d), _STEP, inst, inst.version)

    def _admit(self, inst: _Instance, t: float) -> None:
        waiting = inst.waiting
        while waiting:
            s = waiting[0]
            running = len(inst.prefilling) + inst.n_decode + inst.running_other + len(inst.pending_join)
            if running >= inst.max_seqs:
                return
            own = inst.cache.get(s.cid, 0)
            # Every unpinned cache entry can be evicted; the conversation's own entry becomes part of this
            # sequence's KV. If the footprint does not fit next to the admitted ones: wait (head-of-line).
            if inst.reserved + s.reserve > inst.cap:
                return
            waiting.popleft()
            ts = s.ts
            # Take the conversation's own cache entry out (it becomes part of this sequence's KV).
            if own:
                inst.cache_take(s.cid)
            inst.cache_evict(s.reserve)
            inst.reserved += s.reserve
            if inst.reserved > inst.peak_reserved:
                inst.peak_reserved = inst.reserved
            s.admitted = True
            inst.dirty = True
            blk = inst.block
            if s.kind == _DECODE_ONLY:
                tokens = kv_shipped_tokens(ts.input_tokens, own if inst.cache_on else 0, blk)
                nbytes = tokens * inst.kvb
                src = self.insts[ts.prefill_inst]
                link = inst.link if inst.link == src.link else _slower(inst.link, src.link)
                dur = kv_transfer_time_s(tokens, inst.kvb, link)
                if ts.history_tokens:  # a round trip: both sides' block bookkeeping over history + new
                    dur += kv_round_trip_bookkeeping_s(ts.input_tokens)
                ts.kv_admit_s = t
                ts.transfer_tokens = tokens
                ts.transfer_bytes = nbytes
                self.kv_transfers += 1
                self.kv_transfer_bytes += nbytes
                inst.running_other += 1
                inst.nondecode_kv += ts.input_tokens
                s.state = _T
                self._push(t + dur, _XFER, s, None)
                continue
            hit = min(own, ts.input_tokens - 1) // blk * blk if inst.cache_on else 0
            if s.pulled > hit:  # history KV shipped in from the decoder (a round trip)
                hit = min(s.pulled, ts.input_tokens - 1) // blk * blk
            s.cached = hit
            s.prefill_total = ts.input_tokens - hit
            s.prefill_done = 0
            inst.queued_prefill += s.prefill_total - s.queued_estimate
            ts.cached_tokens = hit
            ts.prefilled_tokens = s.prefill_total
            ts.prefill_start_s = t
            if s.kind == _FULL:
                ts.kv_admit_s = t
            inst.nondecode_kv += ts.input_tokens
            s.state = _P
            inst.prefilling.append(s)

    def _plan(self, inst: _Instance, t: float) -> None:
        inst.busy = False
        inst.cur = None
        self._admit(inst, t)
        if inst.pending_join:
            for s in inst.pending_join:
                ts = s.ts
                inst.running_other -= 1
                inst.nondecode_kv -= ts.input_tokens
                s.ctx_entry = ts.input_tokens
                s.entry_step = inst.steps_done
                ts.first_step = inst.steps_done + 1
                s.last_step = ts.last_step = inst.steps_done + ts.output_tokens
                heapq.heappush(inst.heap, (s.last_step, s.key, s))
                s.state = _D
                inst.n_decode += 1
                inst.ctx_sum += s.ctx_entry
            inst.pending_join.clear()
            inst.dirty = True
        tm = inst.tm
        nd = inst.n_decode
        if inst.prefilling:
            budget = inst.budget - nd
            chunks: list[tuple[_Seq, int]] = []
            for s in inst.prefilling:
                if budget <= 0:
                    break
                c = min(budget, s.prefill_total - s.prefill_done)
                chunks.append((s, c))
                budget -= c
            if chunks:
                s0, c0 = chunks[0]
                dt = tm.step_time_s(c0, s0.cached + s0.prefill_done, nd, inst.ctx_sum)
                if len(chunks) > 1:
                    base = tm.decode_step_time_s(max(nd, 1), inst.ctx_sum)
                    for s, c in chunks[1:]:
                        dt += tm.step_time_s(c, s.cached + s.prefill_done, nd, inst.ctx_sum) - base
                ptok = sum(c for _, c in chunks)
                # Decode power is mostly KV traffic: pass the batch's context, not just its size.
                pw = tm.step_power_w(ptok, nd, inst.ctx_sum, s0.cached + s0.prefill_done)
                inst.busy = True
                inst.version += 1
                inst.cur = (t, 1, dt, 0.0, pw, True, chunks)
                self._push(t + dt, _STEP, inst, inst.version)
                return
        if nd:
            n = inst.heap[0][0] - inst.steps_done
            a = tm.decode_step_time_s(nd, inst.ctx_sum)
            d = tm.decode_step_time_s(nd, inst.ctx_sum + nd) - a
            # One draw for the whole stretch, at its mean context (context grows by nd tokens per step).
            pw = tm.step_power_w(0, nd, inst.ctx_sum + (nd * n) // 2)
            inst.busy = True
            inst.version += 1
            inst.cur = (t, n, a, d, pw, False, [])
            self._push(t + _cum(n, a, d), _STEP, inst, inst.version)

    def _commit(self, inst: _Instance, t: float) -> None:
        cur = inst.cur
        assert cur is not None
        t0, n, a, d, pw, is_prefill, chunks = cur
        nd = inst.n_decode
        inst.segments.append((t0, t, n, a, d, pw, inst.steps_done))
        if nd:
            inst.tbt_gap_token_s += (t - t0) * nd
            inst.tbt_tokens += nd * n
        inst.steps_done += n
        inst.ctx_sum += nd * n
        inst.decode_tokens += nd * n
        inst.dirty = True
        # decoders that emitted their last token
        heap = inst.heap
        while heap and heap[0][0] <= inst.steps_done:
            _, _, s = heapq.heappop(heap)
            inst.n_decode -= 1
            inst.ctx_sum -= s.ctx_entry + (inst.steps_done - s.entry_step)
            self._finish_turn(inst, s, t)
        if not is_prefill:
            return
        for s, c in chunks:
            s.prefill_done += c
            inst.queued_prefill -= c
            inst.prefill_tokens += c
            inst.prefill_log.append((t0, t, s.ts, c))  # the step's span: energy books it where it ran
        done = [s for s, _ in chunks if s.prefill_done >= s.prefill_total]
        if not done:
            return
        inst.prefilling = [s for s in inst.prefilling if s.prefill_done < s.prefill_total]
        for s in done:
            ts = s.ts
            ts.prefill_end_s = t
            if s.kind == _FULL:
                # the step that finishes a prefill samples the first token
                ts.first_token_s = t
                ts.first_step = inst.steps_done
                inst.decode_tokens += 1
                inst.nondecode_kv -= ts.input_tokens
                if ts.output_tokens == 1:
                    ts.last_step = inst.steps_done
                    s.ctx_entry, s.entry_step = ts.input_tokens + 1, inst.steps_done
                    self._finish_turn(inst, s, t)
                    continue
                s.ctx_entry = ts.input_tokens + 1
                s.entry_step = inst.steps_done
                s.last_step = ts.last_step = inst.steps_done + ts.output_tokens - 1
                heapq.heappush(heap, (s.last_step, s.key, s))
                s.state = _D
                inst.n_decode += 1
                inst.ctx_sum += s.ctx_entry
            else:  # prefill-only: hand the KV to the decoder (which must allocate it first)
                s.state = _H
                partner = s.partner
                assert partner is not None
                dec = self.insts[ts.decode_inst]
                if not dec.healthy:
                    self._restart(ts, t)
                    continue
                self._enqueue(dec, partner, t)

    def _finish_turn(self, inst: _Instance, s: _Seq, t: float) -> None:
        ts = s.ts
        s.state = _X
        ts.last_token_s = t
        if ts.first_step == ts.last_step and math.isnan(ts.first_token_s):
            ts.first_token_s = t
        inst.reserved -= s.reserve
        conv = self.convs[ts.conv]
        if inst.cache_on:
            inst.cache_put(s.cid, ts.input_tokens + ts.output_tokens, ts.turn < len(conv.turns))
        inst.dirty = True
        cid = conv.conversation_id
        self.policy.observe_turn_end(cid, ts.turn, ts.output_tokens)
        final = ts.turn >= len(conv.turns)
        if not final:  # the router's accounting after a turn: its whole context (Router._finish)
            self._pin_account(ts.conv, ts.input_tokens + ts.output_tokens)
        self.feedback.append(Feedback(t, cid, ts.turn, ts.output_tokens, final, self._next_call()))
        if self.admission and (final or self.rule.reserve is Reserve.TURN):
            self._adm_release(ts.conv, t)
        if ts.turn < len(conv.turns):
            gap = conv.turns[ts.turn].tool_gap_s
            if gap > 0:
                self._push(t + gap, _ARRIVE, ts.conv, ts.turn + 1)
            else:  # no tool gap: the next turn is queued before the instance schedules its next step
                self._arrive(ts.conv, ts.turn + 1, t)
        else:
            self.policy.forget(cid)
            self._unpin(ts.conv)
            self.done += 1
            if self.progress is not None:
                self.progress(self.done, len(self.convs))

    def _xfer_done(self, s: _Seq, t: float) -> None:
        ts = s.ts
        if s.epoch != ts.epoch:
            return  # the turn was restarted after a failure
        src = self.insts[ts.prefill_inst]
        dec = self.insts[ts.decode_inst]
        p = s.partner
        assert p is not None
        # the prefiller frees its copy (kept in its prefix cache)
        p.state = _X
        s.state = _J
        src.reserved -= p.reserve
        src.nondecode_kv -= ts.input_tokens
        if src.cache_on and src.healthy:
            src.cache_put(p.cid, ts.input_tokens, False)
        src.dirty = True
        self._wake(src, t)
        if not dec.healthy:
            return
        dec.pending_join.append(s)
        dec.dirty = True
        self._wake(dec, t)

    # ---- failures ------------------------------------------------------------------------------------
    def _fail(self, inst: _Instance, t: float) -> None:
        """The instance stops: its sequences are re-placed (full re-prefill); turns elsewhere that depend
        on it restart too. It keeps drawing idle power (the GPU is still powered)."""
        if not inst.healthy:
            return
        if inst.busy and inst.cur is not None:
            t0, n, a, d, pw, is_pre, _ = inst.cur
            m = 0 if is_pre else _steps_by(t - t0, a, d, n)
            # bill the interrupted step(s) up to the failure; the partial work is lost
            inst.segments.append((t0, t, m, a, d, pw, inst.steps_done))
            inst.steps_done += m
        inst.healthy = False
        inst.busy = False
        inst.cur = None
        inst.version += 1
        inst.dirty = True
        victims = [
            st[-1] for st in self.turn_states
            if st and any(q.inst == inst.idx and q.state != _X for q in st[-1].seqs)
        ]
        for q in list(inst.waiting) + inst.prefilling + [x[2] for x in inst.heap] + inst.pending_join:
            q.state = _X
        inst.waiting.clear()
        inst.prefilling.clear()
        inst.heap.clear()
        inst.pending_join.clear()
        inst.cache.clear()
        inst.live.clear()
        inst.live_total = 0
        inst.n_decode = inst.ctx_sum = inst.reserved = inst.nondecode_kv = 0
        inst.cache_total = inst.queued_prefill = inst.running_other = 0
        for ts in victims:
            for q in ts.seqs:
                if q.inst == inst.idx:
                    q.state = _X
            self._restart(ts, t)
        if self.adm_parked:  # decisions waiting for room on the failed instance are taken again
            lost = [ts for ts, pl in self.adm_parked if pl.decode_instance == inst.id
                    or pl.prefill_instance == inst.id]
            self.adm_parked = [(ts, pl) for ts, pl in self.adm_parked if ts not in lost]
            self.adm_waiting[:0] = lost
        if self.admission:
            self._adm_retry(t)

    def _restart(self, ts: _TurnState, t: float) -> None:
        """Re-place a turn that lost an instance: release its footprint on healthy instances, place again."""
        ts.epoch += 1
        touched = []
        for q in ts.seqs:
            if q.state != _X and self.insts[q.inst].healthy:
                self._release(self.insts[q.inst], q)
                touched.append(self.insts[q.inst])
        ts.seqs = []
        ts.restarts += 1
        ts.prefill_start_s = ts.prefill_end_s = ts.kv_admit_s = ts.first_token_s = math.nan
        ts.transfer_tokens = ts.transfer_bytes = ts.first_step = ts.last_step = ts.history_tokens = 0
        for inst in touched:
            self._wake(inst, t)
        self._arrive(ts.conv, ts.turn, t, ts)

    def _release(self, inst: _Instance, q: _Seq) -> None:
        inp = q.ts.input_tokens
        st = q.state
        if st == _W:
            inst.waiting.remove(q)
            if q.kind != _DECODE_ONLY:
                inst.queued_prefill -= q.queued_estimate
        elif st == _P:
            inst.prefilling.remove(q)
            inst.queued_prefill -= q.prefill_total - q.prefill_done
            inst.reserved -= q.reserve
            inst.nondecode_kv -= inp
        elif st == _H:
            inst.reserved -= q.reserve
            inst.nondecode_kv -= inp
        elif st in (_T, _J):
            if st == _J:
                inst.pending_join.remove(q)
            inst.running_other -= 1
            inst.nondecode_kv -= inp
            inst.reserved -= q.reserve
        elif st == _D:
            inst.heap = [x for x in inst.heap if x[2] is not q]
            heapq.heapify(inst.heap)
            inst.n_decode -= 1
            inst.ctx_sum -= q.ctx_entry + (inst.steps_done - q.entry_step)
            inst.reserved -= q.reserve
        q.state = _X
        inst.dirty = True

    # ---- results -------------------------------------------------------------------------------------
    def result(self, wall_s: float, energy_window_s: float | None) -> SimResult:
        makespan = max((ts.last_token_s for st in self.turn_states for ts in st), default=0.0)
        makespan = max(makespan, max((c.arrival_s for c in self.convs), default=0.0))
        turns: list[TurnRecord] = []
        convs: list[ConversationRecord] = []
        starts = [[seg[6] for seg in inst.segments] for inst in self.insts]
        for states in self.turn_states:  # remote-decoded turns: first token = end of their first step
            for ts in states:
                if math.isnan(ts.first_token_s) and ts.first_step > 0:
                    ts.first_token_s = _step_end_s(self.insts[ts.decode_inst], ts.first_step, starts)
        for ci, c in enumerate(self.convs):
            states = self.turn_states[ci]
            for ts in states:
                turns.append(self._turn_record(ts))
            first, last = states[0], states[-1]
            dec = self.insts[last.decode_inst]
            tbt_mean, tbt_p95, gaps = _tbt(
                dec, last.first_step, last.last_step, last.first_token_s, last.last_token_s, starts[dec.idx]
            )
            # the artifact's convention: t0 = router-side admission (= arrival without it), and past turn
            # 1's prefiller queue for the policies whose halves the artifact ran separately
            admitted = self.admitted_s[ci] if self.admission else first.arrival_s
            t0_adm = admitted
            if self.rule.exclude_turn1_prefill_queue and first.remote:
                t0_adm = max(admitted, first.prefill_start_s)
            ttfet, e2e = final_turn_times(first.arrival_s, last.first_token_s, last.last_token_s)
            ttfet_adm, e2e_adm = final_turn_times(t0_adm, last.first_token_s, last.last_token_s)
            # an emulated delay the run's clocks must count (TurnDelay.conversation_offset_s)
            off = self.turn_delay.conversation_offset_s(c.conversation_id) if self.turn_delay else 0.0
            convs.append(
                ConversationRecord(
                    conversation_id=c.conversation_id,
                    arrival_s=c.arrival_s,
                    turns=len(states),
                    tokens=c.total_tokens,
                    # the simulator times every token: never None
                    ttfet_s=ttfet + off,  # type: ignore[operator]
                    e2e_s=e2e + off,  # type: ignore[operator]
                    ttfet_admission_s=ttfet_adm + off,  # type: ignore[operator]
                    e2e_admission_s=e2e_adm + off,  # type: ignore[operator]
                    last_turn_tbt_mean_s=tbt_mean,
                    last_turn_tbt_p95_s=tbt_p95,
                    decoders=tuple(self.insts[ts.decode_inst].id for ts in states),
                    admission_wait_s=admitted - c.arrival_s,
                    last_turn_gaps_s=gaps if self.opts.record_tbt_gaps else None,
                )
            )
        decoded: dict[int, list[_TurnState]] = {}
        for states in self.turn_states:
            for ts in states:
                decoded.setdefault(ts.decode_inst, []).append(ts)
        windows, energies = _energy(self.insts, makespan, energy_window_s, self.convs, decoded)
        stats_fn = getattr(self.policy, "prediction_stats", None)
        pstats: dict[str, Any] = {}
        if callable(stats_fn):
            st = stats_fn()
            pstats = {k: getattr(st, k) for k in st.__slots__} if hasattr(st, "__slots__") else dict(st)
        return SimResult(
            policy=self.policy.name,
            seed=self.seed,
            makespan_s=makespan,
            conversations=tuple(convs),
            turns=tuple(turns),
            instances=tuple(energies),
            energy_windows=tuple(windows),
            energy_window_s=energy_window_s,
            kv_transfers=self.kv_transfers,
            kv_transfer_bytes=self.kv_transfer_bytes,
            decisions=tuple(self.decisions),
            feedback=tuple(self.feedback),
            events=self.events,
            wall_s=wall_s,
            max_kv_used_tokens={i.id: i.peak_reserved for i in self.insts},
            policy_stats=pstats,
            router_admission=self.admission,
            admission_parked=self.adm_parked_count,
            power_steps=tuple(self.power.steps) if self.power is not None else (),
        )

    def _turn_record(self, ts: _TurnState) -> TurnRecord:
        return TurnRecord(
            conversation_id=self.convs[ts.conv].conversation_id,
            turn=ts.turn,
            arrival_s=ts.arrival_s,
            input_tokens=ts.input_tokens,
            output_tokens=ts.output_tokens,
            decode_instance=self.insts[ts.decode_inst].id,
            prefill_instance=self.insts[ts.prefill_inst].id,
            remote_prefill=ts.remote,
            prefill_start_s=ts.prefill_start_s,
            prefill_end_s=ts.prefill_end_s,
            kv_admit_s=ts.kv_admit_s,
            first_token_s=ts.first_token_s,
            last_token_s=ts.last_token_s,
            cached_tokens=ts.cached_tokens,
            prefilled_tokens=ts.prefilled_tokens,
            transfer_tokens=ts.transfer_tokens,
            transfer_bytes=ts.transfer_bytes,
            restarts=ts.restarts,
            history_transfer_tokens=ts.history_tokens,
        )


_LINK_ORDER = ("ethernet", "infiniband", "pcie", "nvlink")


def _slower(a: str, b: str) -> str:
    ra = _LINK_ORDER.index(a) if a in _LINK_ORDER else 0
    rb = _LINK_ORDER.index(b) if b in _LINK_ORDER else 0
    return _LINK_ORDER[min(ra, rb)]


def _step_durations(inst: _Instance, lo: int, hi: int, starts: list[int]) -> np.ndarray:
    """Durations of instance steps with 1-based indices lo..hi (inclusive); starts[k] = segment k's step0."""
    if hi < lo:
        return np.empty(0)
    segs = inst.segments

    k = max(0, bisect.bisect_right(starts, lo - 1) - 1)
    parts: list[np.ndarray] = []
    while k < len(segs):
        t0, t1, n, a, d, _, step0 = segs[k]
        if step0 >= hi:
            break
        s_lo = max(lo, step0 + 1)
        s_hi = min(hi, step0 + n)
        if s_hi >= s_lo:
            i = np.arange(s_lo - step0 - 1, s_hi - step0, dtype=np.float64)
            parts.append(a + d * i)
        k += 1
    return np.concatenate(parts) if parts else np.empty(0)


def _step_end_s(inst: _Instance, step: int, starts: list[list[int]]) -> float:
    """Virtual time at which 1-based instance step `step` ended."""
    st = starts[inst.idx]
    k = bisect.bisect_right(st, step - 1) - 1
    t0, _, n, a, d, _, step0 = inst.segments[k]
    return t0 + _cum(step - step0, a, d)


def _tbt(
    inst: _Instance, first_step: int, last_step: int, t_first: float, t_last: float, starts: list[int]
) -> tuple[float, float, np.ndarray]:
    """Mean and p95 inter-token gap of a turn, and the gaps (the durations of its steps 2..n)."""
    n = last_step - first_step
    if n <= 0:
        return 0.0, 0.0, np.empty(0)
    gaps = _step_durations(inst, first_step + 1, last_step, starts)
    mean = (t_last - t_first) / n
    p95 = float(np.percentile(gaps, 95)) if len(gaps) else mean
    return mean, p95, gaps


def _steps_done_at(inst: _Instance, t: float, seg_idx: int) -> tuple[int, int]:
    """Steps completed by time t, scanning segments from seg_idx; returns (steps, new seg_idx)."""
    segs = inst.segments
    k = seg_idx
    while k < len(segs) and segs[k][1] <= t:
        k += 1
    if k < len(segs) and segs[k][0] < t:
        t0, _, n, a, d, _, step0 = segs[k]
        return step0 + _steps_by(t - t0, a, d, n), k
    if k < len(segs):
        return segs[k][6], k
    return inst.steps_done, k


def _energy(
    insts: Sequence[_Instance],
    makespan: float,
    window_s: float | None,
    convs: Sequence[ConversationSpec],
    decoded: Mapping[int, list[_TurnState]],
) -> tuple[list[EnergyWindow], list[InstanceEnergy]]:
    windows: list[EnergyWindow] = []
    energies: list[InstanceEnergy] = []
    if window_s is not None and window_s <= 0:
        raise SimulationError(f"energy_window_s must be > 0 or None, got {window_s}")
    for inst in insts:
        idle_w = inst.tm.idle_w
        busy_s = sum(s[1] - s[0] for s in inst.segments)
        if window_s is None or makespan <= 0:
            busy_j = sum((s[1] - s[0]) * s[5] for s in inst.segments)
            idle_j = max(0.0, makespan - busy_s) * idle_w
            total = busy_j + idle_j
        else:
            nwin = max(1, math.ceil(makespan / window_s - 1e-12))
            e_busy = np.zeros(nwin)
            t_busy = np.zeros(nwin)
            for t0, t1, _, _, _, pw, _ in inst.segments:
                w = int(t0 // window_s)
                while t0 < t1 and w < nwin:
                    w_end = (w + 1) * window_s if w < nwin - 1 else max(makespan, t1)
                    seg_end = min(t1, w_end)
                    e_busy[w] += (seg_end - t0) * pw
                    t_busy[w] += seg_end - t0
                    t0 = seg_end
                    w += 1
            bounds = [min(makespan, (w + 1) * window_s) if w < nwin - 1 else makespan for w in range(nwin)]
            starts = [w * window_s for w in range(nwin)]
            lengths = np.array([bounds[w] - starts[w] for w in range(nwin)])
            # The documented idle rule (energy/attribution.py, as `serve` applies it): a window's idle row is
            # the idle draw over the whole window, capped at its energy; the rest is the work's.
            # InstanceEnergy.idle_energy_j stays the draw while no step ran (busy energy = energy - that).
            idle_free = np.maximum(0.0, lengths - t_busy) * idle_w
            e_win = e_busy + idle_free
            idle_win = np.minimum(lengths * idle_w, e_win)
            # work per turn per window: decode tokens from the step ranges, prefill tokens from the log
            step_at = np.zeros(nwin + 1, dtype=np.int64)
            k = 0
            for w in range(nwin):
                step_at[w + 1], k = _steps_done_at(inst, bounds[w], k)
            work: list[dict[tuple[int, int], list[int]]] = [{} for _ in range(nwin)]
            for ta, tb, ts, c in inst.prefill_log:
                # a chunk's tokens in the windows its step overlapped, in proportion to time (whole tokens)
                w = min(nwin - 1, int(ta // window_s))
                booked = 0
                while booked < c:
                    w_end = bounds[w] if w < nwin - 1 else math.inf
                    upto = c if tb <= w_end or tb <= ta else round(c * (w_end - ta) / (tb - ta))
                    if upto > booked:
                        cell = work[w].setdefault((ts.conv, ts.turn), [0, 0])
                        cell[0] += upto - booked
                        booked = upto
                    w += 1
            for ts in decoded.get(inst.idx, []):
                lo, hi = ts.first_step, ts.last_step
                w = min(nwin - 1, max(0, int(ts.first_token_s // window_s)))
                while w < nwin:
                    a, b = int(step_at[w]) + 1, int(step_at[w + 1])
                    ov = min(hi, b) - max(lo, a) + 1
                    if ov > 0:
                        cell = work[w].setdefault((ts.conv, ts.turn), [0, 0])
                        cell[1] += ov
                    if b >= hi:
                        break
                    w += 1
            total = 0.0
            idle_j = 0.0
            for w in range(nwin):
                ej = float(e_win[w])
                total += ej
                idle_j += float(idle_free[w])
                windows.append(
                    EnergyWindow(
                        instance_id=inst.id,
                        tier=inst.tm.name,
                        start_s=starts[w],
                        end_s=bounds[w],
                        energy_j=ej,
                        idle_energy_j=float(idle_win[w]),
                        work=tuple(
                            WindowWork(convs[ci].conversation_id, turn, v[0], v[1])
                            for (ci, turn), v in sorted(work[w].items())
                        ),
                    )
                )
        energies.append(
            InstanceEnergy(
                instance_id=inst.id,
                tier=inst.tier,
                tier_model=inst.tm.name,
                role=str(inst.role),
                gpus=inst.tm.gpus,
                energy_j=total,
                idle_energy_j=idle_j,
                busy_s=busy_s,
                utilisation=busy_s / makespan if makespan > 0 else 0.0,
                prefill_tokens=inst.prefill_tokens,
                decode_tokens=inst.decode_tokens,
            )
        )
    return windows, energies


def run_simulation(
    instances: Sequence[InstanceLike],
    conversations: Sequence[ConversationSpec],
    policy: Policy,
    *,
    seed: int = 0,
    energy_window_s: float | None = 1.0,
    options: SimOptions | None = None,
    links: Mapping[str, str] | None = None,
    failures: Sequence[tuple[str, float]] = (),
    progress: Callable[[int, int], None] | None = None,
    reference_tier_model: TierModel | None = None,
    slo: Any = None,
    turn_delay: TurnDelay | None = None,
) -> SimResult:
    """Simulate `conversations` on `instances` under `policy`; deterministic for the same inputs and seed.

    `links` maps a tier label to its link type (tiers.links; default pcie). `failures` lists (instance_id,
    time_s) at which an instance stops; its conversations are re-placed. `seed` is recorded (the simulator
    itself draws no random numbers; seeded randomness lives in the workload and in policies' options).
    With `reference_tier_model`, the result also carries per-conversation metrics and their summary
    (orchestrator.metrics: slowdowns against each conversation alone on an idle instance of that tier, SLO
    `slo` -- an orchestrator.metrics.SloSpec, default slowdown 5). `turn_delay` inserts a wait before later
    turns are placed (an emulated client-side delay; :class:`TurnDelay`).
    """
    sim = _Sim(
        instances, conversations, policy, seed, options or SimOptions(), links, failures, progress, turn_delay
    )
    w0 = time.perf_counter()
    # The run allocates millions of small objects that all stay alive until the end; the cyclic garbage
    # collector would rescan them over and over (a 2-3x slowdown) without ever freeing any.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        sim.run()
        if sim.power is not None:
            sim.power.finish()
        wall = time.perf_counter() - w0
        res = sim.result(wall, energy_window_s)
    finally:
        if gc_was_enabled:
            gc.enable()
    if reference_tier_model is None:
        return res
    from orchestrator import metrics as m  # imported here: metrics itself runs the simulator
    from orchestrator.sim.standalone import StandaloneCache

    sa = StandaloneCache(reference_tier_model, sim.opts)
    mets = m.conversation_metrics(res, conversations, sa, slo if slo is not None else m.SloSpec())
    return replace(res, metrics=tuple(mets), summary=m.summarize(res, mets))
