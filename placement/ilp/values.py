"""The planner's inputs and per-option coefficients: workload (``Demand``, ``ConvShape``), SLOs, tiers,
settings, the standalone reference and one ``Option`` with its capacity per constraint family (placement.ilp
docstring: "Symbols", "Workload", "Per-option coefficients", "Constraints")."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum

from tiers.perf import TierModel


class Objective(StrEnum):
    ENERGY = "energy"
    GPUS = "gpus"
    COST = "cost"


class Family(StrEnum):
    """Constraint families, as named in the docstring and in diagnoses."""

    GPUS = "gpus"
    PREFILL = "prefill"  # (3) prefill throughput at the utilisation that meets the TTFET SLO
    KV = "kv"  # (4) decode KV capacity (Little's law)
    TBT = "tbt"  # (5) decode TBT at the planned batch
    TAIL = "tail"  # (6) tail prefill work on decoders
    TRANSFER = "transfer"  # (7) KV-transfer bandwidth


FAMILY_TEXT: dict[Family, str] = {
    Family.GPUS: "GPUs available",
    Family.PREFILL: "turn-1 prefill throughput within the TTFET SLO (M/G/1)",
    Family.KV: "decode KV capacity (Little's law)",
    Family.TBT: "decode TBT at the planned batch",
    Family.TAIL: "tail (turns 2..n) prefill work on decoders",
    Family.TRANSFER: "KV-transfer bandwidth",
}


@dataclass(frozen=True, slots=True)
class ConvShape:
    """One conversation of the workload as the per-conversation SLO model sees it."""

    turn1_tokens: float  # L1_i
    decode_before_final: float  # O_b,i
    later_turns: float  # Kn_i
    gap_s: float  # Gap_i
    tail_tokens: float = 0.0  # P_i: incremental prefill tokens of turns 2..n
    tail_context_tokens: float = 0.0  # their mean cached context
    decode_context_tokens: float = 0.0  # token-weighted context while decoding (standalone TBT)


@dataclass(frozen=True, slots=True)
class Demand:
    """The workload as the planner needs it (built from orchestrator.workload.WorkloadStats)."""

    arrival_rate_per_s: float
    turn1_input_tokens: tuple[int, ...]  # quantile sample of turn-1 input lengths
    decode_tokens: float  # O
    decode_tokens_before_final: float  # O_b
    later_turns: float  # Kn
    tail_prefill_tokens: float  # P
    tail_prefill_context_tokens: float
    kv_decode_token_steps: float  # A
    kv_gap_token_seconds: float  # Agap
    tool_gap_s_total: float  # Gap
    final_context_tokens_max: int
    tokens_per_conversation: float
    turn1_input_tokens_max: int = 0  # longest turn-1 prompt: a prefiller must hold its KV until the hand-off
    shapes: tuple[ConvShape, ...] = ()  # per-conversation sample (empty: the mean conversation stands in)

    @property
    def conv_shapes(self) -> tuple[ConvShape, ...]:
        """The per-conversation sample, or the mean conversation alone when the caller gave none."""
        if self.shapes:
            return self.shapes
        kn = self.later_turns
        return (
            ConvShape(
                self.turn1_mean_tokens,
                self.decode_tokens_before_final,
                kn,
                self.tool_gap_s_total,
                self.tail_prefill_tokens,
                self.tail_prefill_context_tokens,
                self.decode_context_tokens,
            ),
        )

    @property
    def turn1_mean_tokens(self) -> float:
        return sum(self.turn1_input_tokens) / len(self.turn1_input_tokens)

    @property
    def decode_context_tokens(self) -> float:
        """Token-weighted mean context while decoding (A / O)."""
        return self.kv_decode_token_steps / self.decode_tokens if self.decode_tokens else 0.0


@dataclass(frozen=True, slots=True)
class Slo:
    percentile: float = 95.0
    ttfet_slowdown: float | None = 5.0
    ttfet_s: float | None = None
    tbt_slowdown: float | None = 5.0
    tbt_ms: float | None = None

    def scaled(self, f: float) -> Slo:
        return replace(
            self,
            ttfet_slowdown=None if self.ttfet_slowdown is None else self.ttfet_slowdown * f,
            ttfet_s=None if self.ttfet_s is None else self.ttfet_s * f,
            tbt_slowdown=None if self.tbt_slowdown is None else self.tbt_slowdown * f,
            tbt_ms=None if self.tbt_ms is None else self.tbt_ms * f,
        )


@dataclass(frozen=True, slots=True)
class TierSupply:
    """One tier of the fleet: its GPUs and the instance shapes allowed on it."""

    name: str
    gpus: int
    roles: tuple[str, ...]
    models: tuple[TierModel, ...]  # one per allowed (power cap, TP)
    link: str = "pcie"
    cost_per_gpu_hour: float | None = None

    @property
    def idle_w_per_gpu(self) -> float:
        return self.models[0].gpu.idle_w if self.models else 0.0


@dataclass(frozen=True, slots=True)
class Settings:
    objective: Objective = Objective.ENERGY
    unallocated: str = "idle"  # "idle": unallocated GPUs draw idle power; "off": they draw nothing
    kv_occupancy_max: float = 0.9  # kappa
    tail_share_max: float = 0.5  # phi
    link_utilisation_max: float = 0.8
    decode_levels: tuple[float, ...] = (1.0, 0.85, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)  # tau / TBT SLO
    step_multiples: tuple[float, ...] = (1.1, 1.25, 1.5, 2.0, 3.0)  # extra tau levels, x the standalone step
    decoder_caps: bool = True  # False: decode/colocated instances only at TDP (to price the decoder caps)
    # serving modes the planner chooses among (docstring "Serving modes"); hybrid thresholds at these
    # quantiles of the turn-1 length
    modes: tuple[str, ...] = ("disaggregated", "hybrid", "colocated")
    hybrid_quantiles: tuple[float, ...] = (0.1, 0.25, 0.5)
    # set per variant by the mode search (not by callers): the mode and the hybrid threshold
    mode: str = ""
    local_prefill_below_tokens: int = 0
    solver: str = "auto"  # "highs", "cbc", or "auto" (see resolve_solver)
    time_limit_s: float | None = 30.0


@dataclass(frozen=True, slots=True)
class Reference:
    """Standalone latencies of the mean conversation alone on the reference tier (the slowdown baseline)."""

    tier: str
    prefill_s: float  # mean turn-1 prefill
    step_s: float  # decode step at batch 1 and the mean decode context (standalone TBT)
    tail_turn_s: float  # one later turn's incremental prefill
    ttfet_s: float  # prefill + (O_b) step + Kn tail_turn + Gap
    # per conversation of Demand.conv_shapes: standalone TTFET T0_i and standalone decode step (TBT) t0_i
    ttfet_i_s: tuple[float, ...] = ()
    step_i_s: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Option:
    tier: str
    role: str
    power_cap_w: float
    tp: int
    model: TierModel = field(repr=False)
    # prefill side (roles prefill, colocated)
    prefill_s: float = 0.0  # S_j
    prefill2_s2: float = 0.0  # S2_j
    transfer_s: float = 0.0  # X_j
    rho_max: float = 0.0
    # decode side (roles decode, colocated)
    tau_s: float = 0.0
    batch_max: float = 0.0  # B_j
    residence_s: float = 0.0  # R_j
    mu_tbt: float = 0.0
    kv_capacity_tokens: int = 0
    kv_token_seconds: float = 0.0  # KVTS_j
    tail_busy_s: float = 0.0  # W_j
    local_tokens: float = 0.0  # turn-1 tokens per conversation prefilled on this decoder (hybrid/colocated)
    local_below_tokens: int = 0  # the variant's hybrid threshold (every option of a hybrid solve carries it)
    transfer_capacity_bytes_per_s: float = 0.0  # V_j
    # energy
    fixed_w: float = 0.0  # F_j
    joules_per_conversation: float = 0.0  # E_j
    usable: bool = True
    reason: str = ""

    @property
    def gpus(self) -> int:
        return self.model.tp

    @property
    def key(self) -> str:
        return f"{self.tier}/{self.role}/{self.power_cap_w:g}W/tp{self.tp}"

    @property
    def does_prefill(self) -> bool:
        return self.role in ("prefill", "colocated")

    @property
    def does_decode(self) -> bool:
        return self.role in ("decode", "colocated")

    def caps_per_instance(self, demand: Demand, settings: Settings) -> dict[Family, float]:
        """Conversations/s one instance can take under each constraint family (inf: not limiting)."""
        out: dict[Family, float] = {}
        if self.does_prefill:
            out[Family.PREFILL] = self.rho_max / self.prefill_s if self.prefill_s > 0 else math.inf
        if self.does_decode:
            out[Family.KV] = (
                settings.kv_occupancy_max * self.kv_capacity_tokens / self.kv_token_seconds
                if self.kv_token_seconds > 0
                else math.inf
            )
            out[Family.TBT] = self.mu_tbt
            out[Family.TAIL] = (
                settings.tail_share_max / self.tail_busy_s if self.tail_busy_s > 0 else math.inf
            )
        if self.role in ("prefill", "decode"):
            per_conv = demand.turn1_mean_tokens * self.model.model.kv_bytes_per_token
            out[Family.TRANSFER] = self.transfer_capacity_bytes_per_s / per_conv if per_conv > 0 else math.inf
        return out

    def capacity_per_instance(self, demand: Demand, settings: Settings) -> float:
        return min(self.caps_per_instance(demand, settings).values(), default=0.0)
