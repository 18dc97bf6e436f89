"""The simulator's instance model: a turn's mutable record, its sequences and one engine instance (batch,
KV reservations, prefix cache, the view it shows the policies), and the closed-form sums of a decode stretch.

Split out of orchestrator/sim/core.py (issue 11 item 6); the model is described in orchestrator/sim/engine.py.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque

from orchestrator.core import instance_view
from orchestrator.sim.options import InstanceLike, SimOptions
from placement.base import InstanceView, Role
from tiers.perf import TierModel
from tiers.serving import with_serving_overhead

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
        "conv",
        "turn",
        "arrival_s",
        "input_tokens",
        "output_tokens",
        "decode_inst",
        "prefill_inst",
        "remote",
        "prefill_start_s",
        "prefill_end_s",
        "kv_admit_s",
        "first_token_s",
        "last_token_s",
        "cached_tokens",
        "prefilled_tokens",
        "transfer_tokens",
        "transfer_bytes",
        "restarts",
        "first_step",
        "last_step",
        "epoch",
        "seqs",
        "history_tokens",
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
        "key",
        "ts",
        "kind",
        "cid",
        "reserve",
        "prefill_total",
        "prefill_done",
        "cached",
        "ctx_entry",
        "entry_step",
        "last_step",
        "partner",
        "admitted",
        "epoch",
        "queued_estimate",
        "inst",
        "state",
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
        "idx",
        "id",
        "tier",
        "role",
        "tm",
        "cap",
        "block",
        "max_seqs",
        "budget",
        "healthy",
        "cache_on",
        "waiting",
        "prefilling",
        "heap",
        "n_decode",
        "ctx_sum",
        "pending_join",
        "reserved",
        "nondecode_kv",
        "cache",
        "cache_total",
        "steps_done",
        "busy",
        "cur",
        "version",
        "segments",
        "prefill_log",
        "queued_prefill",
        "running_other",
        "pinned",
        "view",
        "dirty",
        "peak_reserved",
        "kvb",
        "link",
        "prefill_tokens",
        "decode_tokens",
        "live",
        "live_total",
        "adm_used",
        "pinned_tokens",
        "view_live",
        "tbt_gap_token_s",
        "tbt_tokens",
        "accepting",
        "parked",
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
        self.accepting = True  # takes new conversations (the power controller's parking, sim/power.py)
        self.parked: list[tuple[float, float, float]] = []  # (start, end, W per instance) while parked
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
                accepting=self.accepting,
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
