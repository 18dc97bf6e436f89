"""Values the simulator returns: per-turn and per-conversation records, energy, transfers, decisions.

Pure frozen dataclasses (no I/O). Times are virtual seconds from the start of the run. Every energy figure
here is *modelled* from the tier's power model, not measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from placement.base import FleetView, Placement, TurnRequest


@dataclass(frozen=True, slots=True)
class TurnRecord:
    conversation_id: str
    turn: int  # 1-based
    arrival_s: float
    input_tokens: int
    output_tokens: int
    decode_instance: str
    prefill_instance: str  # == decode_instance for a local prefill
    remote_prefill: bool
    prefill_start_s: float  # admitted on the instance that prefills it (KV allocated there)
    prefill_end_s: float
    kv_admit_s: float  # KV allocated on the decode instance (== prefill_start_s for a local prefill)
    first_token_s: float
    last_token_s: float
    cached_tokens: int  # prefix-cache hit on the instance that prefilled
    prefilled_tokens: int  # tokens actually computed in prefill
    transfer_tokens: int
    transfer_bytes: int
    restarts: int = 0  # times the turn was re-placed because an instance failed
    history_transfer_tokens: int = 0  # KV round trip: history shipped decoder -> prefiller before the prefill

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s


@dataclass(frozen=True, slots=True)
class ConversationRecord:
    conversation_id: str
    arrival_s: float
    turns: int
    tokens: int  # prompt + output tokens of every turn (the paper's tokens/J numerator)
    ttfet_s: float  # arrival of turn 1 -> first token of the final turn
    e2e_s: float  # arrival of turn 1 -> last token of the final turn
    # the artifact's convention (orchestrator.sim.admission): t0 = router-side KV admission (= arrival when
    # the run has none), moved past turn 1's prefiller queue for conserve and per-turn
    ttfet_admission_s: float
    e2e_admission_s: float
    last_turn_tbt_mean_s: float  # 0.0 when the final turn has a single output token
    last_turn_tbt_p95_s: float
    decoders: tuple[str, ...]  # decode instance of each turn
    admission_wait_s: float = 0.0  # arrival of turn 1 -> router-side KV admission (0 without admission)
    # every inter-token gap of the final turn, s (SimOptions.record_tbt_gaps; None when not recorded)
    last_turn_gaps_s: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class InstanceEnergy:
    instance_id: str
    tier: str  # the fleet's tier label
    tier_model: str  # TierModel.name (GPU@cap/tp)
    role: str
    gpus: int
    energy_j: float  # busy + idle, modelled; equals the sum of this instance's energy windows
    idle_energy_j: float
    busy_s: float
    utilisation: float  # busy_s / makespan_s
    prefill_tokens: int
    decode_tokens: int


@dataclass(frozen=True, slots=True)
class WindowWork:
    conversation_id: str
    turn: int
    prefill_tokens: int
    decode_tokens: int


@dataclass(frozen=True, slots=True)
class EnergyWindow:
    """Modelled energy of one instance over [start_s, end_s) and the work it did for each turn in it."""

    instance_id: str
    tier: str
    start_s: float
    end_s: float
    energy_j: float
    idle_energy_j: float
    work: tuple[WindowWork, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """One call of the policy, as the simulator made it (for the parity test and debugging)."""

    time_s: float
    turn: TurnRequest
    placement: Placement
    view: FleetView | None = None  # recorded only with record_views=True
    order: int = 0  # position among all policy calls (place, observe_turn_end) of the run


@dataclass(frozen=True, slots=True)
class Feedback:
    """One observe_turn_end call (replayed in order by the parity test)."""

    time_s: float
    conversation_id: str
    turn: int
    output_tokens: int
    final: bool = False  # the conversation ended: forget() was called right after observe_turn_end()
    order: int = 0


@dataclass(frozen=True, slots=True)
class KvGapStats:
    """What the closed-loop gap rule did in a run (orchestrator.sim.gaps; SimOptions.kv_gap_rule), modelled.
    Counts are tool gaps (a conversation between two of its turns whose KV was on its decoder)."""

    gaps: int
    kept: int  # kept on the decoder until the next turn
    offloaded: int  # copied to host memory, copied back when the next turn arrived
    dropped: int  # freed; the next turn re-prefilled its context
    evicted_while_kept: int  # kept by the rule, but the prefix cache's LRU evicted (part of) it meanwhile
    restore_s: float  # summed waits of next turns for their KV's copy back
    copy_energy_j: float  # host copies out and back at the decoder's idle draw (in SimResult.energy_j)
    idle_kv_token_s: float  # tokens x seconds of the gaps (what keeping everything would hold)
    released_kv_token_s: float  # of those, the part after a release (not held on the decoder)

    @property
    def idle_share_released(self) -> float:
        return self.released_kv_token_s / self.idle_kv_token_s if self.idle_kv_token_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class SimResult:
    policy: str
    seed: int
    makespan_s: float
    conversations: tuple[ConversationRecord, ...]
    turns: tuple[TurnRecord, ...]
    instances: tuple[InstanceEnergy, ...]
    energy_windows: tuple[EnergyWindow, ...]
    energy_window_s: float | None
    kv_transfers: int
    kv_transfer_bytes: int
    decisions: tuple[Decision, ...]
    feedback: tuple[Feedback, ...]
    events: int
    wall_s: float  # wall time the run took (the only wall-clock figure; not used by the model)
    max_kv_used_tokens: dict[str, int] = field(default_factory=dict)  # per instance, peak reserved
    policy_stats: dict[str, Any] = field(default_factory=dict)  # e.g. the per-turn predictor's error
    # per-conversation metrics with slowdowns (orchestrator.metrics.ConversationMetrics) and their summary,
    # filled when run_simulation() gets a reference_tier_model
    metrics: tuple[Any, ...] = ()
    summary: Any = None
    router_admission: bool = False  # SimOptions.router_admission was on (orchestrator.sim.admission)
    admission_parked: int = 0  # admissions whose chosen engine had no room yet (waited for that engine)
    # refused after SimOptions.admission_wait_s at router-side admission (live: 503); no turn of theirs ran
    refused_conversations: tuple[str, ...] = ()
    # the power controller's steps (orchestrator.sim.power.PowerStep; SimOptions.power_controller), modelled
    power_steps: tuple[Any, ...] = ()
    # the closed-loop gap rule's record (SimOptions.kv_gap_rule), None when off; its host copies' modelled
    # energy is part of energy_j
    kv_gaps: KvGapStats | None = None

    @property
    def energy_j(self) -> float:
        extra = self.kv_gaps.copy_energy_j if self.kv_gaps is not None else 0.0
        return sum(i.energy_j for i in self.instances) + extra

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.conversations)

    @property
    def tokens_per_j(self) -> float:
        e = self.energy_j
        return self.tokens / e if e > 0 else 0.0

    def energy_by_tier_j(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i in self.instances:
            out[i.tier_model] = out.get(i.tier_model, 0.0) + i.energy_j
        return out

    def utilisation_by_role(self) -> dict[str, float]:
        acc: dict[str, list[float]] = {}
        for i in self.instances:
            acc.setdefault(i.role, []).append(i.utilisation)
        return {r: sum(v) / len(v) for r, v in acc.items()}
