"""The simulator's options and the protocols it drives: what an instance must provide (:class:`InstanceLike`),
an emulated client-side wait (:class:`TurnDelay`) and the per-run switches (:class:`SimOptions`).

Split out of orchestrator/sim/core.py (issue 11 item 6); ``orchestrator.sim.core`` re-exports every name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.errors import SimulationError
from placement.base import Role
from placement.kv_gaps import HostMemory
from tiers.connector import kv_bookkeeping_s
from tiers.perf import TierModel

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
    # with router_admission: a conversation whose turn 1 has waited this long for room is refused, as serve
    # answers 503 after its admission wait (the same rule: orchestrator.core.admission.admit); refused
    # conversations count as SLO violations. None: unbounded (the artifact's clients waited forever). Later
    # turns of full-disagg's per-turn reservations still wait unbounded here.
    admission_wait_s: float | None = None
    # the resident KV policies see: only the sequences' KV, as a live engine reports it (vLLM's
    # kv_cache_usage_perc counts no evictable cached block) and the live router sees it (False, the default:
    # the router/simulator parity test, tests/core/test_driver_parity.py), or also the prefix-cache entries of
    # conversations still going (True: what docs/paper-reproduction.md's tables were measured with,
    # orchestrator.sim.paper.PAPER_SIM_OPTIONS). Pinned conversations count either way (their pin accounting).
    view_cached_histories: bool = False
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
    # the keep / offload / drop rule for KV across tool gaps, closed loop (orchestrator.sim.gaps,
    # placement.kv_gaps): off by default (every idle conversation's KV stays in its decoder's prefix cache and
    # pin accounting until the next turn, evicted only by the cache's LRU). kv_gap_host: each decoder's
    # host-memory tier for offloads (None: no host tier, releases drop and the next turn re-prefills)
    kv_gap_rule: bool = False
    kv_gap_host: HostMemory | None = None

    def __post_init__(self) -> None:
        for name in ("max_batched_tokens", "max_seqs", "prefill_max_batched_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise SimulationError(f"SimOptions.{name} must be >= 1, got {v}")
        if self.kv_gap_host is not None and not self.kv_gap_rule:
            raise SimulationError(
                "SimOptions.kv_gap_host is the gap rule's host tier: set kv_gap_rule=True too"
            )
        if self.admission_wait_s is not None and not self.admission_wait_s >= 0:
            raise SimulationError(f"SimOptions.admission_wait_s must be >= 0 s, got {self.admission_wait_s}")

    def budget_for(self, role: Role) -> int:
        if role == Role.PREFILL and self.prefill_max_batched_tokens is not None:
            return self.prefill_max_batched_tokens
        return self.max_batched_tokens
