"""Capacity planner: how many instances of each tier x power cap x TP size to run in each role (PuLP ILP).

Pure: inputs are frozen values (tier models, a workload summary, SLOs), output is a frozen solution. Must not
import fastapi, sqlalchemy, httpx, orchestrator, or read wall-clock time (the caller times the solve).

Symbols (code names in brackets)
---------------------------------
Options j in J: one (tier t(j), power cap, TP size, role) [``Option``]; roles: P (prefill), D (decode),
C (colocated: both). g_j GPUs per instance [``Option.gpus``]; G_t GPUs of tier t [``TierSupply.gpus``].
lam: conversation arrival rate (1/s) [``Demand.arrival_rate_per_s``].

Decision variables
    n_j in Z>=0   instances of option j                                  [``n[j]``]
    l_j >= 0  conversations/s whose turn 1 (j in P), tail (j in D) or both (j in C) option j serves [``l[j]``]

Workload (per conversation means, ``Demand``): L1 turn-1 input tokens (a quantile sample), O decode tokens,
O_b decode tokens before the final turn, Kn later turns, P tail-prefill tokens (turns 2..n), Gap total tool
gap, A = E[sum_k out_k (in_k + out_k/2)] token-steps, Agap = E[sum_k gap_k ctx_k] token-seconds. And a
sample of the conversations themselves, i in I (``Demand.shapes``, ``ConvShape``: L1_i, O_b,i, Kn_i, Gap_i,
their tail prefills and decode context) for the per-conversation SLO model below.

Per-option coefficients (``Option``; computed by :func:`build_options` from the tier model)
    S_j, S2_j      mean and second moment of the turn-1 prefill time over the L1 sample
    X_j            KV hand-off time of the mean turn-1 prompt over the tier's link
    tau            the decode step-time target of this solve (the "level", see below), <= the TBT SLO
    step_j(B)      mean step time of a decoder with B running conversations: the tier's decode step at context
                   B * ctx (ctx = A / O, the token-weighted mean context) + the tail prefill of B (P/O) tokens
                   per step (chunked prefill; + the turn-1 prefill of L1/O tokens per step for j in C)
    B_j            largest B with step_j(B) <= tau                                          [``batch_max``]
    R_j  active residence of a conversation on its decoder at step tau: (O + Kn) tau, the steps it spends in
                   the batch (tool gaps hold KV, not batch slots)                          [``residence_s``]
    mu_j           B_j / R_j: conversations/s one decoder sustains at tau (Little's law on the active batch)
                                                                                            [``mu_tbt``]
    KVTS_j  A tau + Agap: KV-token-seconds per conversation  [``kv_token_seconds``]
    K_j            KV capacity in tokens; kappa the planned maximum KV occupancy (default 0.9)
    W_j  P * (tier's marginal prefill time per tail token): tail-prefill busy seconds per conversation
    phi            maximum share of a decoder's time spent on tail prefills (default 0.5)
    V_j            KV bytes per second one instance's link carries: u_link * link bandwidth * g_j
    rho_j  the largest prefill utilisation at which at most 1 - p/100 of the conversations miss their own
           TTFET bound (per-conversation queueing model below)

Constraints
    (1) GPUs  sum_{j in t} g_j n_j <= G_t  for each tier t  [``gpus:<t>``]
    (2) coverage  sum_{j in P u C} l_j = lam ;  sum_{j in D u C} l_j = lam  [``cover:*``]
    (3) prefill  l_j S_j <= rho_j n_j  j in P u C  [``prefill:<j>``]
    (4) KV         l_j KVTS_j <= kappa K_j n_j          (Little's law: resident KV = rate x KV-token-seconds)
    (5) TBT        l_j <= mu_j n_j                      (resident conversations B = l_j R_j / n_j <= B_j)
    (6) tail       l_j W_j <= phi n_j                   (incremental prefills of turns 2..n on decoders)
    (7) transfer   l_j E[L1] kv_bytes <= V_j n_j                                        j in P u D
    (4)-(6) hold for j in D u C.

Objective (``Objective``)
    energy: sum_j (F_j n_j + E_j l_j) [- sum_j idle_gpu_t(j) g_j n_j + const, when unallocated GPUs idle]
        prefill: F_j = idle power, E_j = S_j (prefill power - idle): dynamic joules per conversation;
        decode:  F_j = P_j(1) (the objective prices a decoder as always stepping; the predictions of
                 :func:`_predict` bill Poisson occupancy: idle draw with probability exp(-B) of an empty
                 batch), E_j = R_j (P_j(B_j) - P_j(1)) / (B_j - 1):
                 power affine in the batch between batch 1 and B_j, B = l R / n. P_j(B) is the tier model's
                 decode draw at batch B over B x ctx resident KV tokens [``decode_power_at_w``] (decode
                 power is mostly memory traffic, so the context is passed, not left at its no-KV default);
        colocated: decode terms + S_j (prefill power - decode power at batch 1) per conversation.
    gpus: sum_j g_j n_j.     cost: sum_j g_j n_j $/GPU-hour of tier t(j).

Per-conversation SLO model (TTFET, TBT, E2E) -- what the simulator and the paper measure
    The SLO is the p-th percentile over conversations of each conversation's own slowdown: its latency / the
    same conversation alone on an idle instance of the reference tier. For conversation i of the sample:
        standalone  T0_i = S_ref(L1_i) + O_b,i t0_i + Kn_i S_ref(P_i / Kn_i | ctx_i) + Gap_i,
                    t0_i = the reference tier's decode step at batch 1 over i's decode context;
        served      TTFET_i = W + S_j(L1_i) + X_j(L1_i) + D_i(tau),  D_i(tau) = (O_b,i + Kn_i) tau + Gap_i
                    (X_j = 0 on a colocated instance; one step per later turn for its incremental prefill);
        bound       b_i = min(ttfet_slowdown x T0_i, ttfet_s).
    Queueing model: each prefill (or colocated) instance is an M/G/1 FCFS queue: Poisson conversation
    arrivals split evenly over the pool's instances (least-work routing does no worse), service S over the L1
    sample. Waiting time W: Pollaczek-Khinchine mean E[W] = rho S2 / (2 S (1 - rho)), and Kingman's
    exponential tail P(W > w) = rho exp(-w / theta), theta = E[W] / rho = S2 / (2 S (1 - rho)). Assumptions:
    Poisson arrivals; W independent of the conversation's own shape (FCFS, the wait is caused by others);
    the decoder's step is its planned mean step for every conversation (no per-step variance); tool gaps and
    output lengths as in the trace (no prediction is used).
    Constraint: the share of conversations that miss their bound, (1/|I|) sum_i P(W > b_i - S_j(L1_i) -
    X_j(L1_i) - D_i(tau)) (1 when the argument is < 0), must be <= 1 - p/100; rho_j is the largest rho that
    keeps it there (bisection; the share rises with rho). The tail therefore comes from the workload's own
    distribution: short conversations (small T0_i) are the ones a queueing wait pushes over their bound.
    TBT: every conversation of a decoder sees its step, so the p-th percentile TBT slowdown is step / the
    (100 - p)-th percentile of t0_i; tau <= tbt_slowdown x that percentile (``tbt_floor_s``).
    E2E: E2E_i = TTFET_i + the final turn's decode; with both TTFET and TBT slowdowns <= their bounds, E2E's
    slowdown is <= the larger one (a mediant), so it needs no constraint of its own.
    Predictions (:func:`_predict`): the p-th percentile of TTFET (seconds) and of the TTFET slowdown are the
    quantiles of the mixture over the prefill pools (weighted by their load) and the conversations, at the
    planned operating point (the actual decode step, not the target tau).

Levels
    tau couples both phases (a slower decode leaves less TTFET budget for prefill queueing). The planner
    considers tau over a grid of fractions of the TBT SLO (``Settings.decode_levels``) plus small multiples of
    the standalone step; the best proven-optimal level wins (= one ILP with a binary choice of level).
    Bound and prune (:func:`_best`): each level's LP relaxation (n_j continuous) bounds its ILP from below;
    levels are solved in order of their bound and the search stops when the next bound cannot beat the
    incumbent -- exact, and usually one ILP instead of ~10.

Reductions before the solve (exact)
    - tiers that differ only by name are merged and the solution split back (:func:`merge_identical_tiers`);
    - an option dominated by another of the same tier, role and g_j (no less capacity, no higher objective
      coefficients) is dropped (:func:`dominated`);
    - the families (3)-(7) of one option are one row, l_j <= min_f cap_f n_j (same feasible set; the
      per-family rows are kept only in the elastic diagnosis).

Solver status
    A solution is accepted only when prob.status is Optimal AND LpSolution[prob.sol_status] says an optimal
    solution was found (CBC reports status Optimal with an integer-feasible, unproven solution after a
    time-out), with both solvers told the same relative gap ``MIP_REL_GAP`` (1e-6). Integer values are
    rounded. Inputs are never mutated.

Infeasibility diagnosis (:func:`diagnose`)
    (a) elastic ILP: every family (3)-(7) gets a slack sigma >= 0 in conversations/s (l_j <= cap n_j + sigma),
        GPUs stay hard; minimising sum sigma shows which families bind and by how much load;
    (b) the fewest extra GPUs of one tier that make the fleet feasible (elastic GPU constraint);
    (c) the smallest SLO scaling (TTFET and TBT slowdowns x f) that makes it feasible (bisection on f).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np
import pulp

from placement.errors import PlanningError
from tiers.links import kv_transfer_time_s, link_spec
from tiers.perf import TierModel

TIE_BREAK_W = 1e-3  # W per allocated GPU added to the energy objective (see objective_coefficients)
# Relative optimality gap at which a solve counts as proven optimal: |incumbent - bound| <= 1e-6 |incumbent|
# (0.1 W on a 100 kW fleet). Passed to both solvers (HiGHS's own default would be 1e-4, CBC's 0).
MIP_REL_GAP = 1e-6


@functools.lru_cache(maxsize=1)
def _highs_available() -> bool:
    return bool(pulp.HiGHS().available())


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


# ---------------------------------------------------------------------------------------------------------
# queueing and operating points
# ---------------------------------------------------------------------------------------------------------


def mg1_wait_quantile_s(rho: float, s_mean: float, s2_mean: float, percentile: float) -> float:
    """p-quantile of the M/G/1 waiting time (P-K mean, exponential tail with P(W>0) = rho)."""
    if rho <= 0:
        return 0.0
    if rho >= 1:
        return math.inf
    q = 1.0 - percentile / 100.0
    if rho <= q:
        return 0.0
    mean_w = rho * s2_mean / (2.0 * s_mean * (1.0 - rho))
    return mean_w / rho * math.log(rho / q)


def mg1_wait_mean_s(rho: float, s_mean: float, s2_mean: float) -> float:
    if rho <= 0:
        return 0.0
    if rho >= 1:
        return math.inf
    return rho * s2_mean / (2.0 * s_mean * (1.0 - rho))


def rho_for_wait(budget_s: float, s_mean: float, s2_mean: float, percentile: float) -> float:
    """Largest utilisation whose p-quantile wait is <= budget_s (0 when budget_s < 0)."""
    if budget_s < 0 or s_mean <= 0:
        return 0.0
    return _bisect_max(
        lambda rho: mg1_wait_quantile_s(rho, s_mean, s2_mean, percentile) <= budget_s, 0.0, 1.0 - 1e-9, 100
    )


def _bisect_max(f: Callable[[float], bool], lo: float, hi: float, iters: int = 80) -> float:
    """Largest x in [lo, hi] with f(x) true, f monotone (true then false); lo is assumed true."""
    if f(hi):
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        if f(mid):
            lo = mid
        else:
            hi = mid
    return lo


def tail_token_s(m: TierModel, demand: Demand) -> float:
    """Marginal seconds per tail-prefill token on `m` (chunked into decode steps, so no per-request

    overhead).
    """
    if demand.later_turns <= 0 or demand.tail_prefill_tokens <= 0:
        return 0.0
    n = max(1, round(demand.tail_prefill_tokens / demand.later_turns))
    c = round(demand.tail_prefill_context_tokens)
    extra = m.step_time_s(n, c, 1, c) - m.decode_step_time_s(1, c)
    return max(extra, 0.0) / n


def turn1_token_s(m: TierModel, demand: Demand) -> float:
    """Marginal seconds per turn-1 prefill token when chunked into decode steps (colocated instances)."""
    n = max(1, round(demand.turn1_mean_tokens))
    extra = m.step_time_s(n, 0, 1, 0) - m.decode_step_time_s(1, 0)
    return max(extra, 0.0) / n


def decode_step_s(
    m: TierModel,
    demand: Demand,
    batch: float,
    colocated: bool = False,
    token_costs_s: tuple[float, float] | None = None,
    local_tokens: float = 0.0,
) -> float:
    """step_j(B): mean step of a decoder running `batch` conversations (decode + chunked prefill share).

    token_costs_s: (tail_token_s, turn1_token_s) of `m` when already computed (they do not depend on B).
    local_tokens: turn-1 tokens per conversation a hybrid decoder prefills itself (colocated: all of them).
    """
    if batch <= 0:
        return 0.0
    if colocated:
        local_tokens = demand.turn1_mean_tokens
    if token_costs_s is None:
        token_costs_s = (tail_token_s(m, demand), turn1_token_s(m, demand) if local_tokens > 0 else 0.0)
    ctx = demand.decode_context_tokens
    per_conv_tokens = demand.tail_prefill_tokens / demand.decode_tokens if demand.decode_tokens else 0.0
    t = m.decode_step_time_s(max(1, math.ceil(batch)), int(batch * ctx))
    t += batch * per_conv_tokens * token_costs_s[0]
    if local_tokens > 0 and demand.decode_tokens:
        t += batch * local_tokens / demand.decode_tokens * token_costs_s[1]
    return t


def decode_power_at_w(m: TierModel, demand: Demand, batch: float) -> float:
    """P_j(B): mean draw of a decoder running `batch` conversations at the planned resident context.

    The tier model's decode power at batch round(B) (at least 1) over B x ctx KV tokens (ctx = A / O, the
    token-weighted mean context while decoding). Memory traffic is most of decode power, so the context
    matters: an A40 with Qwen3-0.6B draws ~121 W for a weights-only step but ~260 W at batch 17 x 17k tokens
    (tiers/perf.py). The tail-prefill share of a step (~1% of its time at the paper's load) is priced as
    decode.
    """
    b = max(1, round(batch))
    return m.decode_power_w(b, int(batch * demand.decode_context_tokens))


def reference_latencies(m: TierModel, demand: Demand, tier: str) -> Reference:
    sample = demand.turn1_input_tokens
    s = sum(m.prefill_time_s(x) for x in sample) / len(sample)
    step = m.decode_step_time_s(1, int(demand.decode_context_tokens))
    if demand.later_turns > 0:
        n = max(1, round(demand.tail_prefill_tokens / demand.later_turns))
        tail = m.prefill_time_s(n, round(demand.tail_prefill_context_tokens))
    else:
        tail = 0.0
    ttfet = s + demand.decode_tokens_before_final * step + demand.later_turns * tail + demand.tool_gap_s_total
    t0: list[float] = []
    st: list[float] = []
    for c in demand.conv_shapes:
        step_i = m.decode_step_time_s(1, int(c.decode_context_tokens))
        tail_i = 0.0
        if c.later_turns > 0:
            n_i = max(1, round(c.tail_tokens / c.later_turns))
            tail_i = c.later_turns * m.prefill_time_s(n_i, round(c.tail_context_tokens))
        pre_i = m.prefill_time_s(max(1, round(c.turn1_tokens)))
        t0.append(pre_i + c.decode_before_final * step_i + tail_i + c.gap_s)
        st.append(step_i)
    return Reference(
        tier=tier,
        prefill_s=s,
        step_s=step,
        tail_turn_s=tail,
        ttfet_s=ttfet,
        ttfet_i_s=tuple(t0),
        step_i_s=tuple(st),
    )


def slo_targets(slo: Slo, ref: Reference) -> tuple[float, float]:
    """(TTFET p-th percentile target s, decode step / mean TBT target s); inf when unconstrained."""
    ttfet = math.inf
    if slo.ttfet_slowdown is not None:
        ttfet = min(ttfet, slo.ttfet_slowdown * ref.ttfet_s)
    if slo.ttfet_s is not None:
        ttfet = min(ttfet, slo.ttfet_s)
    tbt = math.inf
    if slo.tbt_slowdown is not None:
        tbt = min(tbt, slo.tbt_slowdown * tbt_floor_s(ref, slo.percentile))
    if slo.tbt_ms is not None:
        tbt = min(tbt, slo.tbt_ms / 1000.0)
    return ttfet, tbt


def tbt_floor_s(ref: Reference, percentile: float) -> float:
    """The (100 - p)-th percentile of the conversations' standalone decode steps: with one served step for
    every conversation of a decoder, the p-th percentile TBT slowdown is served step / this."""
    if not ref.step_i_s:
        return ref.step_s
    return float(np.percentile(np.asarray(ref.step_i_s), 100.0 - percentile))


def ttfet_targets_s(slo: Slo, ref: Reference) -> np.ndarray:
    """Per-conversation TTFET bound: min(slowdown x its own standalone T0_i, the absolute bound)."""
    t0 = np.asarray(ref.ttfet_i_s if ref.ttfet_i_s else (ref.ttfet_s,), dtype=float)
    out = np.full_like(t0, math.inf)
    if slo.ttfet_slowdown is not None:
        out = np.minimum(out, slo.ttfet_slowdown * t0)
    if slo.ttfet_s is not None:
        out = np.minimum(out, slo.ttfet_s)
    return out


def decode_sides_s(demand: Demand, step_s: float) -> np.ndarray:
    """D_i(step) per conversation: (O_b,i + Kn_i) step + Gap_i."""
    sh = demand.conv_shapes
    return np.array([(c.decode_before_final + c.later_turns) * step_s + c.gap_s for c in sh], dtype=float)


def wait_tail(rho: float, s_mean: float, s2_mean: float) -> tuple[float, float]:
    """(P(W > 0), theta) of the M/G/1 wait with the exponential tail P(W > w) = rho exp(-w / theta),
    theta = E[W] / rho = S2 / (2 S (1 - rho)) (Pollaczek-Khinchine mean, Kingman's tail)."""
    if rho <= 0 or s_mean <= 0:
        return 0.0, 1.0
    if rho >= 1:
        return 1.0, math.inf
    return rho, s2_mean / (2.0 * s_mean * (1.0 - rho))


def violation_share(rho: float, s_mean: float, s2_mean: float, budgets_s: np.ndarray) -> float:
    """Share of conversations whose wait exceeds their own budget: mean_i P(W > b_i) (1 when b_i < 0)."""
    p0, theta = wait_tail(rho, s_mean, s2_mean)
    if not math.isfinite(theta):
        return 1.0
    b = np.asarray(budgets_s, dtype=float)
    pos = np.maximum(b, 0.0)
    tail = np.where(b < 0, 1.0, p0 * np.exp(-pos / theta))
    return float(tail.mean())


def rho_for_budgets(budgets_s: np.ndarray, s_mean: float, s2_mean: float, percentile: float) -> float:
    """Largest utilisation whose per-conversation violation share is <= 1 - p/100 (0: none)."""
    q = 1.0 - percentile / 100.0
    if s_mean <= 0 or violation_share(0.0, s_mean, s2_mean, budgets_s) > q:
        return 0.0
    # bracket on a grid of 32 utilisations at once (one vectorised evaluation), then bisect inside it
    b = np.asarray(budgets_s, dtype=float)
    neg = float((b < 0).mean())
    pos = b[b >= 0]
    grid = np.linspace(0.0, 1.0 - 1e-9, 33)[1:]
    theta = s2_mean / (2.0 * s_mean * (1.0 - grid))
    shares = neg + grid * np.exp(-pos[None, :] / theta[:, None]).sum(axis=1) / len(b)
    ok = shares <= q
    if ok.all():
        return float(grid[-1])
    k = int(np.argmin(ok))  # the first grid point that violates (the share rises with rho)
    lo = float(grid[k - 1]) if k > 0 else 0.0
    return _bisect_max(
        lambda rho: violation_share(rho, s_mean, s2_mean, budgets_s) <= q, lo, float(grid[k]), 16
    )  # bracket width 1/32 -> 16 halvings: rho to ~5e-7 (the returned end is always feasible)


def mixture_quantile(
    parts: Sequence[tuple[float, float, float, float, np.ndarray, np.ndarray]], percentile: float
) -> float:
    """Smallest x with sum_k w_k mean_i P(W_k > x scale_ki - c_ki) <= 1 - p/100 (weights normalised).

    parts: (weight w_k, rho_k, S_k, S2_k, c_k, scale_k) per group k of conversations (a prefill pool's, or
    the hybrid decoders' local prefills with rho 0); c_k: the conversations' fixed latency there; scale = 1
    gives the p-th percentile of TTFET in seconds, scale = T0_i that of the slowdown.
    """
    q = 1.0 - percentile / 100.0
    wsum = sum(p[0] for p in parts) or 1.0

    def share(x: float) -> float:
        return (
            sum(w * violation_share(rho, s, s2, x * sc - c) for w, rho, s, s2, c, sc in parts if len(c))
            / wsum
        )

    hi = 1.0
    while share(hi) > q and hi < 1e9:
        hi *= 2.0
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if share(mid) > q:
            lo = mid
        else:
            hi = mid
    return hi


def decode_side_s(demand: Demand, tau_s: float) -> float:
    """D(tau): time from the end of turn-1 prefill to the final turn's first token at decode step tau."""
    return (demand.decode_tokens_before_final + demand.later_turns) * tau_s + demand.tool_gap_s_total


@dataclass(frozen=True, slots=True)
class _Static:
    """Coefficients of one tier model that do not depend on the decode level (computed once per plan)."""

    s_mean: float
    s2: float
    transfer_s: float
    token_costs_s: tuple[float, float]  # (tail_token_s, turn1_token_s)
    step1_s: tuple[float, float]  # decode_step_s at batch 1: (decode role, colocated role)
    prefill_w: float
    p1_w: float
    w_tail: float
    s_i: np.ndarray  # S_j(L1_i): turn-1 prefill of each conversation of the sample
    x_i: np.ndarray  # X_j(L1_i): its KV hand-off
    local_e_j: float = 0.0  # hybrid: dynamic joules of a mean local turn-1 prefill above P_j(1)


def _static(m: TierModel, link: str, demand: Demand, split: HybridSplit | None = None) -> _Static:
    """split: the hybrid split (its prefill_demand: the conversations the prefill side serves)."""
    pdemand = split.prefill_demand if split is not None else demand
    sample = pdemand.turn1_input_tokens
    l1 = pdemand.turn1_mean_tokens
    s_vals = [m.prefill_time_s(x) for x in sample]
    costs = (tail_token_s(m, demand), turn1_token_s(m, demand))
    kvb = m.model.kv_bytes_per_token
    shapes = pdemand.conv_shapes
    return _Static(
        s_i=np.array([m.prefill_time_s(max(1, round(c.turn1_tokens))) for c in shapes], dtype=float),
        x_i=np.array([kv_transfer_time_s(round(c.turn1_tokens), kvb, link) for c in shapes], dtype=float),
        s_mean=sum(s_vals) / len(s_vals),
        s2=sum(v * v for v in s_vals) / len(s_vals),
        transfer_s=kv_transfer_time_s(round(l1), m.model.kv_bytes_per_token, link),
        token_costs_s=costs,
        step1_s=(decode_step_s(m, demand, 1.0, False, costs), decode_step_s(m, demand, 1.0, True, costs)),
        prefill_w=m.prefill_power_w(round(l1)),
        p1_w=(p1 := decode_power_at_w(m, demand, 1.0)),
        w_tail=demand.tail_prefill_tokens * costs[0],
        local_e_j=split.local_prefill_energy_j(m, p1) if split is not None and split.local_share > 0 else 0.0,
    )


@dataclass(frozen=True, slots=True)
class HybridSplit:
    """Turn-1 prompts below a threshold prefill on their decoder (ConServe's local-prefill refinement)."""

    threshold_tokens: int
    local_share: float  # f: share of conversations below the threshold
    local_tokens: float  # f x E[L1 | L1 < threshold]: turn-1 tokens per conversation prefilled on decoders
    mask: np.ndarray  # conversations of the sample that a prefiller serves
    prefill_demand: Demand  # the prefill side's conversations (L1 >= threshold)
    local_lengths: tuple[float, ...] = ()

    def local_prefill_energy_j(self, m: TierModel, base_w: float) -> float:
        """Dynamic joules of one local turn-1 prefill (mean over the local prompts) above base_w."""
        if not self.local_lengths:
            return 0.0
        tot = 0.0
        for x in self.local_lengths:
            n = max(1, round(x))
            tot += m.prefill_time_s(n) * max(m.prefill_power_w(n) - base_w, 0.0)
        return tot / len(self.local_lengths)


def hybrid_split(demand: Demand, threshold_tokens: int) -> HybridSplit:
    shapes = demand.conv_shapes
    l1 = np.array([c.turn1_tokens for c in shapes], dtype=float)
    if threshold_tokens <= 0:
        return HybridSplit(0, 0.0, 0.0, np.ones(len(shapes), dtype=bool), demand)
    mask = l1 >= threshold_tokens
    if not mask.any():  # a threshold above every prompt: keep the longest on the prefill side
        mask[int(np.argmax(l1))] = True
    f = 1.0 - float(mask.mean())
    local = tuple(float(x) for x in l1[~mask])
    sample = tuple(x for x in demand.turn1_input_tokens if x >= threshold_tokens) or (
        max(demand.turn1_input_tokens),
    )
    pdemand = replace(
        demand,
        turn1_input_tokens=sample,
        shapes=tuple(c for c, k in zip(shapes, mask, strict=True) if k),
    )
    return HybridSplit(
        int(threshold_tokens), f, f * (sum(local) / len(local) if local else 0.0), mask, pdemand, local
    )


def build_options(
    tiers: Sequence[TierSupply],
    demand: Demand,
    slo: Slo,
    ref: Reference,
    tau_s: float,
    settings: Settings,
    cache: dict[tuple[int, int], _Static] | None = None,
) -> list[Option]:
    """All options for decode step target tau_s, with their coefficients (unusable ones carry a reason).

    cache: level-independent coefficients per (tier, model) index, shared by the calls of one planning run
    (pass the same dict for every level; it is keyed by position, so only with the same tiers and demand).
    """
    ttfet_target, _ = slo_targets(slo, ref)
    sample = demand.turn1_input_tokens
    d_side = decode_side_s(demand, tau_s)
    # per-conversation TTFET budgets before the prefill side: bound_i - D_i(tau)
    room_i = ttfet_targets_s(slo, ref) - decode_sides_s(demand, tau_s)
    split = hybrid_split(demand, settings.local_prefill_below_tokens)
    room_i = room_i[split.mask]
    # the prefilled conversations may miss at most (1 - p/100) / (1 - f) of theirs (locals assumed to meet
    # theirs: a short local prefill, no queue)
    q_pre = min(1.0, (1.0 - slo.percentile / 100.0) / max(1.0 - split.local_share, 1e-9))
    pct_pre = 100.0 * (1.0 - q_pre)
    if cache is None:
        cache = {}
    out: list[Option] = []
    for ti, t in enumerate(tiers):
        spec = link_spec(t.link)
        for mi, m in enumerate(t.models):
            cap = m.cap_w
            st = cache.get((ti, mi))
            if st is None:
                st = cache[(ti, mi)] = _static(m, t.link, demand, split)
            s_mean, s2, x = st.s_mean, st.s2, st.transfer_s
            for role in t.roles:
                if not settings.decoder_caps and role != "prefill" and m.power_cap_w is not None:
                    continue
                opt = Option(
                    tier=t.name,
                    role=role,
                    power_cap_w=cap,
                    tp=m.tp,
                    model=m,
                    tau_s=tau_s,
                    local_below_tokens=split.threshold_tokens,
                )
                reasons: list[str] = []
                fixed = 0.0
                per_conv = 0.0
                if role in ("prefill", "colocated"):
                    xj = x if role == "prefill" else 0.0
                    if role == "colocated" and split.local_share > 0:  # colocated prefills all of them
                        continue
                    budgets = room_i - st.s_i - (st.x_i if role == "prefill" else 0.0)
                    rho = (
                        rho_for_budgets(budgets, s_mean, s2, pct_pre if role == "prefill" else slo.percentile)
                        if math.isfinite(ttfet_target)
                        else 1 - 1e-9
                    )
                    if rho <= 0:
                        reasons.append(
                            f"turn-1 prefill (mean {s_mean:.2f} s) + decode side (mean {d_side:.2f} s) "
                            f"exceed more than {100 - slo.percentile:g}% of the conversations' own TTFET "
                            "bounds"
                        )
                    longest = max(demand.turn1_input_tokens_max, max(sample))
                    if m.kv_capacity_tokens < longest:
                        reasons.append(
                            f"KV capacity {m.kv_capacity_tokens} tokens < the longest turn-1 prompt {longest}"
                        )
                    opt = replace(opt, prefill_s=s_mean, prefill2_s2=s2, transfer_s=xj, rho_max=rho)
                    pf_w = st.prefill_w
                if role == "prefill":
                    fixed = m.idle_w
                    per_conv = s_mean * max(pf_w - m.idle_w, 0.0)
                if role in ("decode", "colocated"):
                    colo = role == "colocated"
                    loc = demand.turn1_mean_tokens if colo else split.local_tokens
                    cap_kv = m.kv_capacity_tokens
                    if cap_kv < demand.final_context_tokens_max:
                        reasons.append(
                            f"KV capacity {cap_kv} tokens < the longest conversation's "
                            f"{demand.final_context_tokens_max}"
                        )
                    step1 = (
                        st.step1_s[1 if colo else 0]
                        if loc == 0 or colo
                        else decode_step_s(m, demand, 1.0, False, st.token_costs_s, loc)
                    )
                    if step1 > tau_s:
                        reasons.append(
                            f"a decode step at batch 1 takes {step1 * 1e3:.1f} ms > {tau_s * 1e3:.1f} ms"
                        )
                        bmax = 0.0
                    else:
                        hi = max(2.0, 4.0 * cap_kv / max(demand.decode_context_tokens, 1.0))
                        model_j, colo_j, costs_j, loc_j = m, colo, st.token_costs_s, loc

                        def fits(
                            b: float,
                            model_j: TierModel = model_j,
                            colo_j: bool = colo_j,
                            costs_j: tuple[float, float] = costs_j,
                            loc_j: float = loc_j,
                        ) -> bool:
                            return decode_step_s(model_j, demand, b, colo_j, costs_j, loc_j) <= tau_s

                        bmax = _bisect_max(fits, 1.0, hi, iters=50)
                    # active residence: steps in which the conversation is in the batch (its decode tokens +
                    # one step per later turn's incremental prefill); tool gaps hold KV, not batch slots
                    resid = (demand.decode_tokens + demand.later_turns) * tau_s
                    mu = bmax / resid if resid > 0 else math.inf
                    kvts = demand.kv_decode_token_steps * tau_s + demand.kv_gap_token_seconds
                    w_tail = st.w_tail
                    # decode draw depends on the KV read per step: pass the planned resident context
                    # (batch x the token-weighted mean context A / O); without it the tier model prices
                    # a weights-only step, the lowest possible draw
                    p1 = st.p1_w
                    pb = decode_power_at_w(m, demand, max(1.0, math.floor(bmax)))
                    fixed = p1
                    per_conv = resid * (pb - p1) / (bmax - 1.0) if bmax > 1.0 else 0.0
                    if colo:
                        per_conv += opt.prefill_s * max(pf_w - p1, 0.0)
                    elif split.local_share > 0:  # hybrid: the short turn-1 prefills this decoder does
                        per_conv += split.local_share * st.local_e_j
                    opt = replace(
                        opt,
                        batch_max=bmax,
                        residence_s=resid,
                        mu_tbt=mu,
                        kv_capacity_tokens=cap_kv,
                        kv_token_seconds=kvts,
                        tail_busy_s=w_tail,
                        local_tokens=0.0 if colo else loc,
                    )
                if role in ("prefill", "decode"):
                    opt = replace(
                        opt,
                        transfer_capacity_bytes_per_s=settings.link_utilisation_max
                        * spec.bandwidth_bytes_per_s
                        * m.tp,
                    )
                opt = replace(
                    opt,
                    fixed_w=fixed,
                    joules_per_conversation=per_conv,
                    usable=not reasons,
                    reason="; ".join(reasons),
                )
                out.append(opt)
    return out


# ---------------------------------------------------------------------------------------------------------
# the ILP
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Solution:
    status: str  # "optimal" or "infeasible"
    objective_value: float
    counts: tuple[int, ...]  # n_j, aligned with options
    loads: tuple[float, ...]  # l_j
    solver: str


# "auto" (benchmarks/bench_solver.py; BENCHMARKS.md, "Solver choice"; 2-core EPYC VM, load average 4.5-6):
# - LP relaxations (level bounds, rate searches) on HiGHS, in-process: CBC runs a subprocess per solve;
# - MIPs on CBC, except small problems (fewer than AUTO_HIGHS_MAX_GPUS GPUs and at most AUTO_HIGHS_MAX_SHAPES
#   instance shapes), where HiGHS in-process saves CBC's ~35 ms subprocess (2 tiers = 16 shapes x 100 /
#   1,000 GPUs: MIPs 0.04-0.05 s vs 0.07-0.09 s). In every larger cell CBC proved the optimum faster:
#   10 tiers x 100 GPUs 1.2 s vs HiGHS 2.4 s, 5 x 5,000 0.08 s vs 2.9 s, 10 x 10,000 0.3 s vs 3.2 s.
AUTO_HIGHS_MAX_GPUS = 2_000
AUTO_HIGHS_MAX_SHAPES = 16


def instance_shapes(tiers: Sequence[TierSupply]) -> int:
    """Instance shapes the ILP chooses among: tier x (power cap, TP) x role (the solver's problem size)."""
    return sum(len(t.models) * len(t.roles) for t in tiers)


def resolve_solver(settings: Settings, tiers: Sequence[TierSupply]) -> Settings:
    """settings with solver "auto" replaced by "auto:<MIP solver>", the measured faster one for this size.

    With "auto:<name>" LPs go to HiGHS (if installed) and MIPs to <name>; without highspy everything is CBC.
    """
    name = settings.solver.lower()
    if name != "auto":
        return settings
    if not _highs_available():
        return replace(settings, solver="cbc")
    small = (
        sum(t.gpus for t in tiers) < AUTO_HIGHS_MAX_GPUS and instance_shapes(tiers) <= AUTO_HIGHS_MAX_SHAPES
    )
    return replace(settings, solver="auto:highs" if small else "auto:cbc")


@contextlib.contextmanager
def _c_stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr while C code runs, so nothing it prints reaches stdout.

    HiGHS (highspy 1.16) prints its banner ("Running HiGHS 1.16.0 ...") from C++ on the process's stdout when
    its first model is constructed, before any option (output_flag, pulp's msg=False) can be set; stdout
    carries `plan --json`. Python's own buffers are flushed first and C's stdio buffers before the swap back.
    Without a usable fd 1 or 2 (closed, or a test harness's replacement) it does nothing."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        os.dup2(2, 1)
    except OSError:
        os.close(saved)
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).fflush(None)  # C stdio may hold the banner in its buffer
        os.dup2(saved, 1)
        os.close(saved)


if hasattr(pulp, "HiGHS"):

    class _QuietHiGHS(pulp.HiGHS):  # type: ignore[misc,name-defined]
        """pulp's in-process HiGHS with its model constructed while stdout points at stderr (banner)."""

        def createAndConfigureSolver(self, lp: pulp.LpProblem) -> None:  # noqa: N802 (pulp's name)
            with _c_stdout_to_stderr():
                super().createAndConfigureSolver(lp)


def _solver(settings: Settings, mip: bool = True) -> pulp.LpSolver:
    """The configured solver. Both prove optimality to MIP_REL_GAP (relative gap between the incumbent and
    the best bound); HiGHS's own default is 1e-4, CBC's 0 -- one explicit figure for both."""
    name = settings.solver.lower()
    if name == "auto" or name.startswith("auto:"):  # resolve_solver; unresolved: HiGHS if installed
        mip_name = name.partition(":")[2] or ("highs" if _highs_available() else "cbc")
        name = mip_name if mip or not _highs_available() else "highs"
    kw: dict[str, float] = {"gapRel": MIP_REL_GAP}
    if settings.time_limit_s is not None:
        kw["timeLimit"] = settings.time_limit_s
    if name == "highs":
        if not _highs_available():
            raise PlanningError(
                "solver 'highs' is not available (pip install highspy). To fix: --solver cbc."
            )
        return _QuietHiGHS(msg=False, mip=mip, **kw)
    if name == "cbc":
        return pulp.PULP_CBC_CMD(msg=False, mip=mip, **kw)
    raise PlanningError(f"unknown solver {settings.solver!r}. To fix: use 'highs', 'cbc' or 'auto'.")


def objective_coefficients(opt: Option, tier: TierSupply, settings: Settings) -> tuple[float, float]:
    """(coefficient of n_j, coefficient of l_j) in the objective."""
    if settings.objective == Objective.GPUS:
        return float(opt.gpus), 0.0
    if settings.objective == Objective.COST:
        if tier.cost_per_gpu_hour is None:
            raise PlanningError(
                f"objective 'cost' needs tiers.{tier.name}.cost_per_gpu_hour. To fix: set it for every tier."
            )
        return opt.gpus * tier.cost_per_gpu_hour, 0.0
    idle_credit = tier.idle_w_per_gpu * opt.gpus if settings.unallocated == "idle" else 0.0
    # + TIE_BREAK_W per GPU: between plans of equal power, allocate fewer GPUs (an allocated prefill instance
    # that gets no load draws exactly what an unallocated idle GPU draws)
    return opt.fixed_w - idle_credit + TIE_BREAK_W * opt.gpus, opt.joules_per_conversation


def objective_constant(tiers: Sequence[TierSupply], settings: Settings) -> float:
    if settings.objective == Objective.ENERGY and settings.unallocated == "idle":
        return sum(t.gpus * t.idle_w_per_gpu for t in tiers)
    return 0.0


def dominated(
    options: Sequence[Option], tiers: Sequence[TierSupply], demand: Demand, settings: Settings
) -> frozenset[int]:
    """Indices of usable options that another usable option dominates (dropped before the ILP is built).

    k dominates j when both are the same tier, role and GPUs per instance, and k is no worse on every
    coefficient: capacity per instance (min over families) >= j's, objective per instance <= j's, objective
    per conversation <= j's. Swapping every j instance for a k instance keeps the loads feasible and the
    objective no higher, so dropping j never loses the optimum. Among equal options the first is kept.
    """
    by_tier = {t.name: t for t in tiers}
    groups: dict[tuple[str, str, int], list[tuple[int, float, float, float]]] = {}
    for i, o in enumerate(options):
        if not o.usable:
            continue
        cn, cl = objective_coefficients(o, by_tier[o.tier], settings)
        cap = o.capacity_per_instance(demand, settings)
        groups.setdefault((o.tier, o.role, o.gpus), []).append((i, cap, cn, cl))
    out: set[int] = set()
    for rows in groups.values():
        for i, cap_i, cn_i, cl_i in rows:
            for k, cap_k, cn_k, cl_k in rows:
                if k == i or k in out:
                    continue
                if cap_k >= cap_i and cn_k <= cn_i and cl_k <= cl_i:
                    strictly = cap_k > cap_i or cn_k < cn_i or cl_k < cl_i
                    if strictly or k < i:
                        out.add(i)
                        break
    return frozenset(out)


@dataclass(slots=True)
class _Model:
    prob: pulp.LpProblem
    idx: list[int]
    n: dict[int, pulp.LpVariable]
    lv: dict[int, pulp.LpVariable]


def _build(
    options: Sequence[Option],
    tiers: Sequence[TierSupply],
    demand: Demand,
    settings: Settings,
    extra_gpus: dict[str, int] | None = None,
    relax: bool = False,
) -> _Model | None:
    """The ILP of the module docstring over the usable, undominated options (None: a side has no option).

    One capacity row per option, l_j <= min_f cap_f n_j: the same feasible set as the per-family rows
    (3)-(7), which only the elastic diagnosis needs separately. relax: n_j continuous (the LP bound).
    """
    lam = demand.arrival_rate_per_s
    by_tier = {t.name: t for t in tiers}
    drop = dominated(options, tiers, demand, settings)
    idx = [i for i, o in enumerate(options) if o.usable and i not in drop]
    if not any(options[i].does_prefill for i in idx) or not any(options[i].does_decode for i in idx):
        return None
    cat = pulp.LpContinuous if relax else pulp.LpInteger
    prob = pulp.LpProblem("conserve_plan", pulp.LpMinimize)
    n = {i: pulp.LpVariable(f"n_{i}", lowBound=0, cat=cat) for i in idx}
    lv = {i: pulp.LpVariable(f"l_{i}", lowBound=0) for i in idx}
    coefs = [objective_coefficients(options[i], by_tier[options[i].tier], settings) for i in idx]
    obj = pulp.lpSum([cn * n[i] for i, (cn, _) in zip(idx, coefs, strict=True)])
    obj += pulp.lpSum([cl * lv[i] for i, (_, cl) in zip(idx, coefs, strict=True) if cl])
    prob += obj + objective_constant(tiers, settings)
    for t in tiers:
        gpus = t.gpus + (extra_gpus or {}).get(t.name, 0)
        terms = [options[i].gpus * n[i] for i in idx if options[i].tier == t.name]
        if terms:
            prob += pulp.lpSum(terms) <= gpus, f"gpus:{t.name}"
    lam_p = lam * (1.0 - hybrid_split(demand, settings.local_prefill_below_tokens).local_share)
    prob += pulp.lpSum([lv[i] for i in idx if options[i].does_prefill]) == lam_p, "cover:prefill"
    prob += pulp.lpSum([lv[i] for i in idx if options[i].does_decode]) == lam, "cover:decode"
    for i in idx:
        cap = options[i].capacity_per_instance(demand, settings)
        if math.isfinite(cap):
            prob += lv[i] <= cap * n[i], f"cap:{i}"
    return _Model(prob, idx, n, lv)


def _status_ok(prob: pulp.LpProblem) -> bool:
    return bool(prob.status == pulp.LpStatusOptimal and prob.sol_status == pulp.LpSolutionOptimal)


def lp_bound(
    options: Sequence[Option],
    tiers: Sequence[TierSupply],
    demand: Demand,
    settings: Settings,
    extra_gpus: dict[str, int] | None = None,
) -> float:
    """Objective of the LP relaxation (n_j continuous): a lower bound on :func:`solve`'s (inf: infeasible)."""
    mdl = _build(options, tiers, demand, settings, extra_gpus, relax=True)
    if mdl is None:
        return math.inf
    mdl.prob.solve(_solver(settings, mip=False))
    if not _status_ok(mdl.prob):
        return math.inf
    return float(pulp.value(mdl.prob.objective))


def solve(
    options: Sequence[Option],
    tiers: Sequence[TierSupply],
    demand: Demand,
    settings: Settings,
    extra_gpus: dict[str, int] | None = None,
) -> Solution:
    """Solve the ILP of the module docstring over the usable options. Raises PlanningError on solver

    failure.
    """
    empty = (tuple(0 for _ in options), tuple(0.0 for _ in options))
    mdl = _build(options, tiers, demand, settings, extra_gpus)
    if mdl is None:
        return Solution("infeasible", math.inf, *empty, "")
    prob, n, lv = mdl.prob, mdl.n, mdl.lv
    solver = _solver(settings)
    prob.solve(solver)
    status = pulp.LpStatus[prob.status]
    sol_status = pulp.LpSolution.get(prob.sol_status, str(prob.sol_status))
    if prob.status == pulp.LpStatusInfeasible or prob.sol_status == pulp.LpSolutionInfeasible:
        return Solution("infeasible", math.inf, *empty, solver.name)
    if not _status_ok(prob):
        raise PlanningError(
            f"the solver stopped without a proven optimum (status {status!r}, solution {sol_status!r}). "
            "To fix: raise --time-limit or try --solver highs."
        )
    counts = tuple(int(round(n[i].value() or 0.0)) if i in n else 0 for i in range(len(options)))
    loads = tuple(max(0.0, float(lv[i].value() or 0.0)) if i in lv else 0.0 for i in range(len(options)))
    value = float(pulp.value(prob.objective))
    return Solution("optimal", value, counts, loads, solver.name)


# ---------------------------------------------------------------------------------------------------------
# diagnosis
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Diagnosis:
    shortfalls: tuple[tuple[Family, float], ...]  # family, conversations/s that do not fit (elastic ILP)
    add_gpus: tuple[str, int] | None  # fewest extra GPUs of one tier that make the fleet feasible
    slo_factor: float | None  # smallest SLO scaling that makes it feasible (None: not even at 100x)
    unusable: tuple[str, ...]  # options excluded before solving, with reasons
    message: str
    max_rate_per_s: float = 0.0


def elastic_shortfalls(
    options: Sequence[Option], tiers: Sequence[TierSupply], demand: Demand, settings: Settings
) -> tuple[tuple[Family, float], ...]:
    """Minimise the load (conv/s) that violates each family, all options allowed, GPUs hard."""
    lam = demand.arrival_rate_per_s
    prob = pulp.LpProblem("conserve_elastic", pulp.LpMinimize)
    idx = list(range(len(options)))
    n = {i: pulp.LpVariable(f"n_{i}", lowBound=0, cat="Integer") for i in idx}
    lv = {i: pulp.LpVariable(f"l_{i}", lowBound=0) for i in idx}
    slack: dict[Family, list[pulp.LpVariable]] = {}
    cover_short = {
        "prefill": pulp.LpVariable("short_prefill", lowBound=0),
        "decode": pulp.LpVariable("short_decode", lowBound=0),
    }
    terms = []
    for i in idx:
        o = options[i]
        caps = o.caps_per_instance(demand, settings)
        for fam, cap in caps.items():
            if not math.isfinite(cap):
                continue
            s = pulp.LpVariable(f"s_{fam.value}_{i}", lowBound=0)
            slack.setdefault(fam, []).append(s)
            prob += lv[i] <= cap * n[i] + s
            terms.append(s)
    prob += pulp.lpSum(terms) + 10.0 * pulp.lpSum(cover_short.values())
    for t in tiers:
        prob += pulp.lpSum(options[i].gpus * n[i] for i in idx if options[i].tier == t.name) <= t.gpus
    prob += pulp.lpSum(lv[i] for i in idx if options[i].does_prefill) + cover_short["prefill"] == lam
    prob += pulp.lpSum(lv[i] for i in idx if options[i].does_decode) + cover_short["decode"] == lam
    prob.solve(_solver(settings))
    if prob.status != pulp.LpStatusOptimal:
        return ()
    out: dict[Family, float] = {}
    for fam, ss in slack.items():
        v = sum(float(s.value() or 0.0) for s in ss)
        if v > 1e-6 * max(lam, 1e-9):
            out[fam] = v
    return tuple(sorted(out.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------------------------------------------------
# the whole planning run: levels, predictions, diagnosis
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolPrediction:
    option: Option
    instances: int
    arrival_rate_per_s: float
    utilisation: float  # prefill: rho; decode: max share of the KV / TBT / tail capacity used
    kv_occupancy: float
    batch: float  # planned mean running conversations per decode instance
    step_s: float  # planned mean decode step (mean TBT)
    wait_p_s: float  # prefill: p-quantile queueing wait
    wait_mean_s: float
    watts: float


@dataclass(frozen=True, slots=True)
class PlanResult:
    pools: tuple[PoolPrediction, ...]
    options: tuple[Option, ...]
    solution: Solution
    tau_s: float
    reference: Reference
    ttfet_target_s: float
    tbt_target_s: float
    ttfet_p_s: float  # p-th percentile of TTFET over the conversations (mixture over the prefill pools)
    tbt_mean_s: float
    watts_allocated: float
    watts_unallocated: float
    gpus_used: int
    gpus_available: int
    tokens_per_s: float
    threshold_tokens: int
    levels_tried: int
    cost_per_hour: float | None
    ilps_solved: int = 0  # ILPs the level search solved (the others were pruned by their LP bound)
    mode: str = ""  # disaggregated | hybrid | colocated (threshold_tokens: the hybrid threshold)
    ttfet_slowdown_p: float = 0.0  # p-th percentile of each conversation's TTFET / its own standalone
    tbt_slowdown_p: float = 0.0  # served step / the (100 - p)-th percentile standalone step

    @property
    def watts_total(self) -> float:
        return self.watts_allocated + self.watts_unallocated

    @property
    def tokens_per_j(self) -> float:
        return self.tokens_per_s / self.watts_total if self.watts_total > 0 else 0.0


def decode_operating_point(opt: Option, demand: Demand, rate_per_instance: float) -> tuple[float, float]:
    """(B, step s): the mean active batch B = rate x (O + Kn) step(B) (Little's law over the steps a
    conversation spends in the batch, at the actual, not the target, step time; tool gaps excluded)."""
    if rate_per_instance <= 0:
        return 0.0, 0.0
    colo = opt.role == "colocated"
    loc = opt.local_tokens

    def excess(b: float) -> float:
        step = decode_step_s(opt.model, demand, b, colo, local_tokens=loc)
        resid = (demand.decode_tokens + demand.later_turns) * step
        return rate_per_instance * resid - b

    hi = max(opt.batch_max, 1.0)
    if excess(hi) > 0:  # beyond the planned capacity: report the capacity point
        return hi, decode_step_s(opt.model, demand, hi, colo, local_tokens=loc)
    lo = 1e-9
    for _ in range(80):
        mid = (lo + hi) / 2
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
    b = max(hi, 1e-9)
    return b, decode_step_s(opt.model, demand, max(b, 1.0), colo, local_tokens=loc)


def conserve_threshold_tokens(
    decoder: Option,
    prefiller: Option | None,
    demand: Demand,
    wait_mean_s: float,
    link: str,
    decoder_batch: float = 0.0,
) -> int:
    """Turn-1 input length below which prefilling on the decoder is cheaper than hand-off + queueing.

    Local cost: the decoder's prefill time of L tokens, paid by the conversation itself and, as a stall, by
    each of the decoder's `decoder_batch` running conversations: S_dec(L) (1 + B). Remote cost: the
    prefiller's
    mean M/G/1 wait + its prefill time + the KV transfer of L tokens. Returns the largest L (16-token steps)
    with local < remote, 0 if none. Latency-seconds, not energy: the refinement exists to cut TTFET.
    """
    if prefiller is None:
        return 0
    kvb = decoder.model.model.kv_bytes_per_token

    def local_wins(length: float) -> bool:
        tokens = max(16, int(length))
        local = decoder.model.prefill_time_s(tokens) * (1.0 + max(decoder_batch, 0.0))
        remote = wait_mean_s + prefiller.model.prefill_time_s(tokens) + kv_transfer_time_s(tokens, kvb, link)
        return local < remote

    hi = float(decoder.model.model.max_context_tokens)
    if not local_wins(16):
        return 0
    x = _bisect_max(local_wins, 16.0, hi, iters=40)
    return int(x) // 16 * 16


def _predict(
    options: Sequence[Option],
    sol: Solution,
    tiers: Sequence[TierSupply],
    demand: Demand,
    slo: Slo,
    ref: Reference,
    tau_s: float,
    settings: Settings,
    levels_tried: int,
) -> PlanResult:
    by_tier = {t.name: t for t in tiers}
    pools: list[PoolPrediction] = []
    worst_prefill = 0.0
    worst_decode_side = 0.0
    worst_step = 0.0
    best_wait_mean = math.inf
    main_decoder: Option | None = None
    heaviest_d = -1.0
    parts: list[tuple[float, float, float, float, np.ndarray, np.ndarray]] = []
    shapes = demand.conv_shapes
    split = hybrid_split(demand, settings.local_prefill_below_tokens)
    all_i = np.ones(len(shapes), dtype=bool)
    for o, k, load in zip(options, sol.counts, sol.loads, strict=True):
        if k <= 0:
            continue
        per = load / k
        util = 0.0
        wait_p = wait_m = 0.0
        kv_occ = batch = step = 0.0
        watts = 0.0
        if o.does_prefill:
            rho = per * o.prefill_s
            util = rho
            wait_p = mg1_wait_quantile_s(rho, o.prefill_s, o.prefill2_s2, slo.percentile)
            wait_m = mg1_wait_mean_s(rho, o.prefill_s, o.prefill2_s2)
            worst_prefill = max(worst_prefill, wait_p + o.prefill_s + o.transfer_s)
            best_wait_mean = min(best_wait_mean, wait_m)
            kvb = o.model.model.kv_bytes_per_token
            link = by_tier[o.tier].link
            sel = split.mask if o.role == "prefill" else all_i
            c_i = np.array(
                [
                    o.model.prefill_time_s(max(1, round(c.turn1_tokens)))
                    + (kv_transfer_time_s(round(c.turn1_tokens), kvb, link) if o.role == "prefill" else 0.0)
                    for c, k in zip(shapes, sel, strict=True)
                    if k
                ],
                dtype=float,
            )
            parts.append((load, rho, o.prefill_s, o.prefill2_s2, c_i, sel))
        if o.does_decode:
            batch, step = decode_operating_point(o, demand, per)
            kvts = demand.kv_decode_token_steps * step + demand.kv_gap_token_seconds
            kv_occ = per * kvts / o.kv_capacity_tokens if o.kv_capacity_tokens else 0.0
            shares = [kv_occ / settings.kv_occupancy_max, per / o.mu_tbt if o.mu_tbt > 0 else 0.0]
            if o.tail_busy_s > 0:
                shares.append(per * o.tail_busy_s / settings.tail_share_max)
            util = max([util, *shares])
            worst_step = max(worst_step, step)
            worst_decode_side = max(worst_decode_side, decode_side_s(demand, step))
            if load > heaviest_d:
                heaviest_d, main_decoder = load, o
        if o.role == "prefill":
            watts = k * o.fixed_w + load * o.joules_per_conversation
        else:
            # Poisson occupancy: a decoder with mean active batch B has no sequence in its batch with
            # probability exp(-B) (idle draw), else a batch of B / (1 - exp(-B)) on average
            busy = 1.0 - math.exp(-batch) if batch > 0 else 0.0
            p_b = decode_power_at_w(o.model, demand, max(1.0, batch / busy)) if busy > 0 else o.model.idle_w
            watts = k * (busy * p_b + (1.0 - busy) * o.model.idle_w)
            if o.role == "colocated":
                pf_w = o.model.prefill_power_w(round(demand.turn1_mean_tokens))
                watts += load * o.prefill_s * max(pf_w - p_b, 0.0)
        pools.append(PoolPrediction(o, k, load, util, kv_occ, batch, step, wait_p, wait_m, watts))
    used: dict[str, int] = {}
    for p in pools:
        used[p.option.tier] = used.get(p.option.tier, 0) + p.instances * p.option.gpus
    watts_alloc = sum(p.watts for p in pools)
    watts_unalloc = 0.0
    if settings.unallocated == "idle":
        watts_unalloc = sum((t.gpus - used.get(t.name, 0)) * t.idle_w_per_gpu for t in tiers)
    cost = None
    if all(t.cost_per_gpu_hour is not None for t in tiers):
        cost = sum(
            p.instances * p.option.gpus * (by_tier[p.option.tier].cost_per_gpu_hour or 0.0) for p in pools
        )
    ttfet_target, tbt_target = slo_targets(slo, ref)
    threshold = split.threshold_tokens
    d_i = decode_sides_s(demand, worst_step)
    t0_i = np.asarray(ref.ttfet_i_s if ref.ttfet_i_s else (ref.ttfet_s,) * len(shapes), dtype=float)
    if split.local_share > 0 and main_decoder is not None:  # hybrid: local turn-1 prefills, no queue
        local = ~split.mask
        c_loc = np.array(
            [main_decoder.model.prefill_time_s(max(1, round(c.turn1_tokens))) for c in shapes], dtype=float
        )[local]
        lam = demand.arrival_rate_per_s
        parts.append((lam * split.local_share, 0.0, 1.0, 1.0, c_loc, local))
    full = [(w, rho, s1, s2, c + d_i[m], np.ones(int(m.sum()))) for w, rho, s1, s2, c, m in parts]
    ttfet_p = mixture_quantile(full, slo.percentile) if full else worst_decode_side
    full = [(w, rho, s1, s2, c + d_i[m], t0_i[m]) for w, rho, s1, s2, c, m in parts]
    ttfet_sd = mixture_quantile(full, slo.percentile) if full else 0.0
    floor = tbt_floor_s(ref, slo.percentile)
    return PlanResult(
        pools=tuple(pools),
        options=tuple(options),
        solution=sol,
        tau_s=tau_s,
        reference=ref,
        ttfet_target_s=ttfet_target,
        tbt_target_s=tbt_target,
        ttfet_p_s=ttfet_p,
        ttfet_slowdown_p=ttfet_sd,
        tbt_slowdown_p=worst_step / floor if floor > 0 else 0.0,
        mode=settings.mode or ("colocated" if all(p.option.role == "colocated" for p in pools) else ""),
        tbt_mean_s=worst_step,
        watts_allocated=watts_alloc,
        watts_unallocated=watts_unalloc,
        gpus_used=sum(used.values()),
        gpus_available=sum(t.gpus for t in tiers),
        tokens_per_s=demand.arrival_rate_per_s * demand.tokens_per_conversation,
        threshold_tokens=threshold,
        levels_tried=levels_tried,
        cost_per_hour=cost,
    )


def _levels(tbt_target_s: float, ref: Reference, settings: Settings) -> list[float]:
    """Decode step targets tau: fractions of the TBT target, plus small multiples of the standalone step (so a
    loose TBT SLO still leaves fast-decode levels, which a tight TTFET SLO may need). Equal levels (within
    1e-9 relative) are listed once."""
    base = tbt_target_s if math.isfinite(tbt_target_s) else 10.0 * ref.step_s
    levels = {base * f for f in settings.decode_levels if f > 0}
    levels |= {ref.step_s * m for m in settings.step_multiples if ref.step_s * m < base}
    out: list[float] = []
    for tau in sorted(levels, reverse=True):
        if not out or tau < out[-1] * (1 - 1e-9):
            out.append(tau)
    return out


@dataclass(frozen=True, slots=True)
class _Search:
    """The outcome of the level search: the best level's options and solution, and the search's effort."""

    options: list[Option]
    solution: Solution
    tau_s: float
    levels: int  # (mode variant, decode level) candidates considered
    ilps: int  # ILPs solved (the others were pruned by their LP bound)
    settings: Settings = field(default_factory=Settings)  # the winning variant (mode, hybrid threshold)
    tiers: tuple[TierSupply, ...] = ()


def colocated_roles(t: TierSupply) -> tuple[str, ...]:
    """A tier runs colocated instances when its roles allow them (the fleet file's `roles`)."""
    return ("colocated",) if "colocated" in t.roles else ()


def variants(
    tiers: Sequence[TierSupply], demand: Demand, settings: Settings
) -> list[tuple[Settings, list[TierSupply]]]:
    """The serving-mode variants the planner chooses among (docstring "Serving modes"): (settings with mode
    and hybrid threshold, tiers with the roles of that mode). A settings with its mode already set is one
    variant."""
    if settings.mode:
        return [(settings, list(tiers))]
    out: list[tuple[Settings, list[TierSupply]]] = []
    pd = [replace(t, roles=tuple(r for r in t.roles if r in ("prefill", "decode"))) for t in tiers]
    any_pd = any("prefill" in t.roles for t in pd) and any("decode" in t.roles for t in pd)
    for mode in settings.modes:
        if mode == "colocated":
            colo = [replace(t, roles=colocated_roles(t)) for t in tiers]
            if any(t.roles for t in colo):  # no tier allows colocated instances: nothing to solve
                out.append((replace(settings, mode=mode), colo))
        elif mode not in ("disaggregated", "hybrid"):
            raise PlanningError(
                f"unknown serving mode {mode!r}. To fix: use disaggregated, hybrid or colocated."
            )
        elif not any_pd:  # no tier can prefill or none can decode: no pools to size
            continue
        elif mode == "disaggregated":
            out.append((replace(settings, mode=mode), pd))
        elif mode == "hybrid":
            sample = np.asarray(demand.turn1_input_tokens, dtype=float)
            ths = sorted({int(np.quantile(sample, q)) // 16 * 16 for q in settings.hybrid_quantiles} - {0})
            out += [(replace(settings, mode=mode, local_prefill_below_tokens=th), pd) for th in ths]
    return out


def _best(
    tiers: Sequence[TierSupply],
    demand: Demand,
    slo: Slo,
    ref: Reference,
    settings: Settings,
    extra_gpus: dict[str, int] | None = None,
) -> _Search | None:
    """Best proven optimum over the serving-mode variants x decode levels (= one ILP with a binary choice of
    mode, hybrid threshold and level).

    Bound-and-prune: every (variant, level)'s LP relaxation is a lower bound on its ILP; they are solved in
    order of their bound and the search stops once the next bound cannot beat the incumbent (ties go to the
    earlier variant -- disaggregated, then hybrid, then colocated -- and the larger tau). Exact: a pruned
    candidate's ILP cannot be better.
    """
    _, tbt_target = slo_targets(slo, ref)
    levels = _levels(tbt_target, ref, settings)
    cands: list[tuple[float, int, float, list[Option], Settings, list[TierSupply]]] = []
    vlist = variants(tiers, demand, settings)
    for vi, (vs, vt) in enumerate(vlist):
        cache: dict[tuple[int, int], _Static] = {}
        for li, tau in enumerate(levels):
            opts = build_options(vt, demand, slo, ref, tau, vs, cache)
            bound = lp_bound(opts, vt, demand, vs, extra_gpus)
            if math.isfinite(bound):
                cands.append((bound, vi * len(levels) + li, tau, opts, vs, vt))
    cands.sort(key=lambda c: (c[0], c[1]))
    best: tuple[list[Option], Solution, float, int, Settings, list[TierSupply]] | None = None
    ilps = 0
    for bound, rank, tau, opts, vs, vt in cands:
        if best is not None:
            tol = 1e-9 * max(1.0, abs(best[1].objective_value))
            # a candidate can only win with a strictly lower objective, or an equal one at a lower rank
            if bound > best[1].objective_value + tol or (
                bound >= best[1].objective_value - tol and rank > best[3]
            ):
                continue
        sol = solve(opts, vt, demand, vs, extra_gpus)
        ilps += 1
        if sol.status != "optimal":
            continue
        if best is None:
            best = (opts, sol, tau, rank, vs, vt)
            continue
        tol = 1e-9 * max(1.0, abs(sol.objective_value))
        if sol.objective_value < best[1].objective_value - tol or (
            sol.objective_value <= best[1].objective_value + tol and rank < best[3]
        ):
            best = (opts, sol, tau, rank, vs, vt)
    if best is None:
        return None
    return _Search(best[0], best[1], best[2], len(levels) * len(vlist), ilps, best[4], tuple(best[5]))


def reference_for(tiers: Sequence[TierSupply], demand: Demand, reference_tier: str | None) -> Reference:
    tier = next((t for t in tiers if t.name == reference_tier), None) if reference_tier else tiers[0]
    if tier is None or not tier.models:
        raise PlanningError(f"reference tier {reference_tier!r} has no instance shapes. To fix: check tiers.")
    # the reference is one instance at its highest allowed cap and smallest TP that holds the model with room
    # for KV (a 70B model has none at TP 1 on an 80-141 GB GPU); orchestrator.sim.fleet.reference_tier_model
    # picks the same instance for the simulator's standalone runs
    fits = [x for x in tier.models if x.kv_capacity_tokens > 0] or list(tier.models)
    m = sorted(fits, key=lambda x: (x.tp, -x.cap_w))[0]
    return reference_latencies(m, demand, tier.name)


def plan(
    tiers: Sequence[TierSupply],
    demand: Demand,
    slo: Slo,
    settings: Settings,
    reference_tier: str | None = None,
) -> PlanResult:
    """Plan the fleet: solve one ILP per decode level, keep the best proven optimum, predict its figures.

    Raises PlanningError with a diagnosis (which family binds, by how much, what would fix it) when no level
    is
    feasible.
    """
    if not tiers:
        raise PlanningError("the fleet has no tiers. To fix: list at least one tier.")
    return plan_with_reference(tiers, demand, slo, settings, reference_for(tiers, demand, reference_tier))


def merge_identical_tiers(
    tiers: Sequence[TierSupply],
) -> tuple[list[TierSupply], dict[str, list[TierSupply]]]:
    """Merge tiers that differ only by name (same instance shapes, roles, link and price) into one.

    Identical tiers make the ILP symmetric (swapping their instances changes nothing), which the solver must
    still prove. Merging is exact when any merged solution can be split back: the TP sizes form a
    divisibility chain (1, 2, 4, 8) and every tier's GPU count is a multiple of the largest, so placing
    instances largest first fills the tiers without leftover fragments (:func:`split_merged`). Tiers that do
    not meet this stay separate. Returns (tiers to solve, merged name -> the original tiers).
    """
    groups: dict[tuple[object, ...], list[TierSupply]] = {}
    order: list[tuple[object, ...]] = []
    for t in tiers:
        tps = sorted({m.tp for m in t.models})
        chain = all(b % a == 0 for a, b in zip(tps, tps[1:], strict=False))
        ok = bool(tps) and chain and t.gpus % tps[-1] == 0
        key: tuple[object, ...] = (t.models, t.roles, t.link, t.cost_per_gpu_hour) if ok else ("solo", t.name)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(t)
    out: list[TierSupply] = []
    members: dict[str, list[TierSupply]] = {}
    for key in order:
        g = groups[key]
        merged = g[0] if len(g) == 1 else replace(g[0], gpus=sum(t.gpus for t in g))
        out.append(merged)
        members[merged.name] = g
    return out, members


def split_merged(
    options: Sequence[Option], sol: Solution, members: dict[str, list[TierSupply]]
) -> tuple[list[Option], Solution]:
    """Expand a solution over merged tiers to the original tiers (largest instances first, loads pro rata)."""
    out_opts: list[Option] = []
    counts: list[int] = []
    loads: list[float] = []
    free = {t.name: t.gpus for g in members.values() for t in g}
    order = sorted(range(len(options)), key=lambda i: -options[i].gpus)
    placed: dict[tuple[int, str], int] = {}
    for i in order:
        o, k = options[i], sol.counts[i]
        for t in members.get(o.tier, []):
            take = min(k, free[t.name] // o.gpus)
            if take > 0:
                placed[(i, t.name)] = take
                free[t.name] -= take * o.gpus
                k -= take
        if k > 0:
            raise PlanningError(f"internal: cannot split {sol.counts[i]} x {o.key} over merged tiers")
    for i, o in enumerate(options):
        for t in members.get(o.tier, []):
            k = placed.get((i, t.name), 0)
            out_opts.append(o if t.name == o.tier else replace(o, tier=t.name))
            counts.append(k)
            loads.append(sol.loads[i] * k / sol.counts[i] if sol.counts[i] else 0.0)
    return out_opts, replace(sol, counts=tuple(counts), loads=tuple(loads))


def plan_with_reference(
    tiers: Sequence[TierSupply], demand: Demand, slo: Slo, settings: Settings, ref: Reference
) -> PlanResult:
    """:func:`plan` with given standalone latencies (to compare fleets against one baseline)."""
    if demand.arrival_rate_per_s <= 0:
        raise PlanningError("arrival rate must be > 0. To fix: set workload.arrival_rate_per_s.")
    settings = resolve_solver(settings, tiers)
    merged, members = merge_identical_tiers(tiers)
    best = _best(merged, demand, slo, ref, settings)
    if best is None:
        d = diagnose(tiers, demand, slo, settings, ref)
        raise PlanningError(d.message)
    opts, sol = best.options, best.solution
    if len(merged) < len(tiers):
        opts, sol = split_merged(opts, sol, members)
    r = _predict(opts, sol, tiers, demand, slo, ref, best.tau_s, best.settings, best.levels)
    return replace(r, ilps_solved=best.ilps)


@dataclass(frozen=True, slots=True)
class ModeOutcome:
    """The best plan of one serving mode (modelled), or why there is none."""

    mode: str
    result: PlanResult | None
    reason: str = ""


def best_per_mode(
    tiers: Sequence[TierSupply], demand: Demand, slo: Slo, settings: Settings, ref: Reference
) -> list[ModeOutcome]:
    """For each mode of settings.modes, the least-objective plan of that mode alone (for the explanation)."""
    settings = resolve_solver(settings, tiers)
    merged, members = merge_identical_tiers(tiers)
    out: list[ModeOutcome] = []
    for mode in settings.modes:
        only = replace(settings, modes=(mode,))
        best = _best(merged, demand, slo, ref, only)
        if best is None:
            top = max_rate_per_s(tiers, demand, slo, only, ref)
            out.append(
                ModeOutcome(
                    mode,
                    None,
                    f"infeasible at {demand.arrival_rate_per_s:.4g} conv/s (this mode sustains at most "
                    f"{top:.4g} conv/s within the SLOs; modelled)",
                )
            )
            continue
        opts, sol = best.options, best.solution
        if len(merged) < len(tiers):
            opts, sol = split_merged(opts, sol, members)
        r = _predict(opts, sol, tiers, demand, slo, ref, best.tau_s, best.settings, best.levels)
        out.append(ModeOutcome(mode, r))
    return out


def _max_rate_model(
    opts: Sequence[Option],
    tiers: Sequence[TierSupply],
    demand: Demand,
    settings: Settings,
    relax: bool,
    prefill_instances: int | None = None,
    fixed_counts: Sequence[int] | None = None,
) -> tuple[pulp.LpProblem, pulp.LpVariable] | None:
    """max lam s.t. (1)-(7) with lam a variable. Per (tier, role, GPUs) only the highest-capacity option is
    kept (for the rate, capacity is all that matters). prefill_instances: fix the number of prefill-role
    instances; fixed_counts: fix every n_j (then it is an LP over the loads)."""
    best_of: dict[tuple[str, str, int], tuple[float, int]] = {}
    for i, o in enumerate(opts):
        if not o.usable or (fixed_counts is not None and fixed_counts[i] <= 0):
            continue
        cap = o.capacity_per_instance(demand, settings)
        key = (o.tier, o.role, o.gpus) if fixed_counts is None else (o.tier, o.role, -1 - i)
        if key not in best_of or cap > best_of[key][0]:
            best_of[key] = (cap, i)
    idx = sorted(i for _, i in best_of.values())
    if not any(opts[i].does_prefill for i in idx) or not any(opts[i].does_decode for i in idx):
        return None
    cat = pulp.LpContinuous if relax or fixed_counts is not None else pulp.LpInteger
    prob = pulp.LpProblem("conserve_max_rate", pulp.LpMaximize)
    lam = pulp.LpVariable("lam", lowBound=0)
    n = {i: pulp.LpVariable(f"n_{i}", lowBound=0, cat=cat) for i in idx}
    lv = {i: pulp.LpVariable(f"l_{i}", lowBound=0) for i in idx}
    prob += lam
    for t in tiers:
        terms = [opts[i].gpus * n[i] for i in idx if opts[i].tier == t.name]
        if terms:
            prob += pulp.lpSum(terms) <= t.gpus
    f = hybrid_split(demand, settings.local_prefill_below_tokens).local_share
    prob += pulp.lpSum([lv[i] for i in idx if opts[i].does_prefill]) == (1.0 - f) * lam
    prob += pulp.lpSum([lv[i] for i in idx if opts[i].does_decode]) == lam
    if prefill_instances is not None:
        prob += pulp.lpSum([n[i] for i in idx if opts[i].role == "prefill"]) == prefill_instances
    if fixed_counts is not None:
        for i in idx:
            prob += n[i] == fixed_counts[i]
    for i in idx:
        cap = opts[i].capacity_per_instance(demand, settings)
        if math.isfinite(cap):
            prob += lv[i] <= cap * n[i]
    return prob, lam


def max_rate_per_s(
    tiers: Sequence[TierSupply],
    demand: Demand,
    slo: Slo,
    settings: Settings,
    ref: Reference,
    prefill_instances: int | None = None,
) -> float:
    """Highest arrival rate (conv/s) the fleet sustains within the SLOs: max lam over n, l (ILP per level).

    The options' coefficients do not depend on lam, so lam can be a variable; returns 0 when nothing fits.
    Levels are solved in order of their LP bound and pruned once the bound cannot beat the incumbent.
    prefill_instances: the same with the number of prefill-role instances fixed (to explain a split).
    """
    settings = resolve_solver(settings, tiers)
    _, tbt_target = slo_targets(slo, ref)
    cands: list[tuple[float, list[Option], Settings, list[TierSupply]]] = []
    for vs, vt in variants(tiers, demand, settings):
        if prefill_instances is not None and vs.mode == "colocated":
            continue
        cache: dict[tuple[int, int], _Static] = {}
        for tau in _levels(tbt_target, ref, vs):
            opts = build_options(vt, demand, slo, ref, tau, vs, cache)
            built = _max_rate_model(opts, vt, demand, vs, True, prefill_instances)
            if built is None:
                continue
            prob, lam = built
            prob.solve(_solver(vs, mip=False))
            if _status_ok(prob):
                cands.append((float(lam.value() or 0.0), opts, vs, vt))
    best = 0.0
    for bound, opts, settings, tiers in sorted(cands, key=lambda c: -c[0]):
        if bound <= best * (1 + 1e-9):
            break
        built = _max_rate_model(opts, tiers, demand, settings, False, prefill_instances)
        if built is None:
            continue
        prob, lam = built
        prob.solve(_solver(settings))
        if _status_ok(prob):
            best = max(best, float(lam.value() or 0.0))
    return best


def max_rate_of_counts(
    options: Sequence[Option],
    counts: Sequence[int],
    tiers: Sequence[TierSupply],
    demand: Demand,
    settings: Settings,
) -> float:
    """Highest arrival rate (conv/s) a fixed set of instances sustains within the SLOs (an LP over loads)."""
    settings = resolve_solver(settings, tiers)
    th = max((o.local_below_tokens for o in options), default=0)
    settings = replace(settings, local_prefill_below_tokens=th, mode=settings.mode or "fixed")
    built = _max_rate_model(options, tiers, demand, settings, True, fixed_counts=counts)
    if built is None:
        return 0.0
    prob, lam = built
    prob.solve(_solver(settings, mip=False))
    return float(lam.value() or 0.0) if _status_ok(prob) else 0.0


@dataclass(frozen=True, slots=True)
class Burst:
    """A finite run of N conversations arriving at lam above the rate mu the plan sustains (fluid model).

    Arrivals at rate lam over T_a = N / lam; the fleet admits conversations at mu < lam, so an admission
    backlog builds up during the arrivals and drains after them. The k-th arrival (t = k / lam) starts at
    k / mu: it waits w_k = k (1/mu - 1/lam) beyond the steady-state (planned) waits. Hence
        backlog when arrivals stop  N (1 - mu / lam)
        drain after the last arrival  N (1/mu - 1/lam)  (= the last conversation's extra wait)
        makespan  N / mu;  extra wait: mean = drain / 2, p-th percentile = p/100 x drain.
    A steady stream at lam would have no such bound: its backlog grows without limit.
    """

    conversations: int
    requested_rate_per_s: float  # lam
    sustainable_rate_per_s: float  # the most any split of the fleet sustains within the SLOs
    plan_rate_per_s: float  # mu: the most the planned instances sustain within the SLOs
    excess_fraction: float  # lam / mu - 1
    arrival_span_s: float
    backlog_conversations: float
    drain_s: float
    makespan_s: float
    extra_wait_mean_s: float
    extra_wait_p_s: float


def burst(conversations: int, lam: float, mu: float, sustainable: float, percentile: float) -> Burst:
    """The fluid estimate of :class:`Burst` (mu > 0)."""
    n = float(conversations)
    mu_eff = min(mu, lam)
    drain = n * (1.0 / mu_eff - 1.0 / lam)
    return Burst(
        conversations=conversations,
        requested_rate_per_s=lam,
        sustainable_rate_per_s=sustainable,
        plan_rate_per_s=mu,
        excess_fraction=lam / mu - 1.0,
        arrival_span_s=n / lam,
        backlog_conversations=n * (1.0 - mu_eff / lam),
        drain_s=drain,
        makespan_s=n / mu_eff,
        extra_wait_mean_s=drain / 2.0,
        extra_wait_p_s=drain * percentile / 100.0,
    )


def diagnose(
    tiers: Sequence[TierSupply], demand: Demand, slo: Slo, settings: Settings, ref: Reference
) -> Diagnosis:
    """Explain an infeasible fleet (see the module docstring, 'Infeasibility diagnosis')."""
    settings = resolve_solver(settings, tiers)
    _, tbt_target = slo_targets(slo, ref)
    levels = _levels(tbt_target, ref, settings)
    # (a) elastic ILP at the level whose shortfall is smallest
    shortfalls: tuple[tuple[Family, float], ...] = ()
    best_short = math.inf
    unusable: tuple[str, ...] = ()
    for tau in levels:
        opts = build_options(tiers, demand, slo, ref, tau, settings)
        sf = elastic_shortfalls(opts, tiers, demand, settings)
        total = sum(v for _, v in sf)
        if total < best_short:
            best_short, shortfalls = total, sf
            unusable = tuple(f"{o.key}: {o.reason}" for o in opts if not o.usable)
    # (b) fewest extra GPUs (of one tier) that make it feasible
    add: tuple[str, int] | None = None
    for t in tiers:
        if not t.models:
            continue
        hi = max(1, t.gpus)
        found = None
        while hi <= max(64, 64 * t.gpus):
            if _best(tiers, demand, slo, ref, settings, {t.name: hi}) is not None:
                found = hi
                break
            hi *= 2
        if found is None:
            continue
        lo = found // 2
        while lo + 1 < found:
            mid = (lo + found) // 2
            if _best(tiers, demand, slo, ref, settings, {t.name: mid}) is not None:
                found = mid
            else:
                lo = mid
        if add is None or found < add[1]:
            add = (t.name, found)
    # (c) SLO scaling
    factor: float | None = None
    if _best(tiers, demand, slo.scaled(100.0), ref, settings) is not None:
        lo_f: float = 1.0
        hi_f: float = 100.0
        for _ in range(12):
            mid_f = math.sqrt(lo_f * hi_f)
            if _best(tiers, demand, slo.scaled(mid_f), ref, settings) is not None:
                hi_f = mid_f
            else:
                lo_f = mid_f
        factor = hi_f
    lam = demand.arrival_rate_per_s
    parts = ["the fleet cannot serve the workload within the SLOs"]
    if shortfalls:
        parts.append(
            "binding: "
            + "; ".join(
                f"{FAMILY_TEXT[f]} short by {v:.3g} conv/s ({100 * v / lam:.0f}% of {lam:g})"
                for f, v in shortfalls
            )
        )
    fixes = []
    if add is not None:
        gpu_name = next(t.models[0].gpu.name for t in tiers if t.name == add[0])
        fixes.append(f"add {add[1]} {gpu_name} to tier {add[0]!r}")
    if factor is not None:
        bits = []
        if slo.ttfet_slowdown is not None:
            bits.append(f"TTFET p{slo.percentile:g} slowdown to {slo.ttfet_slowdown * factor:.3g}x")
        if slo.ttfet_s is not None:
            bits.append(f"ttfet_s to {slo.ttfet_s * factor:.3g} s")
        if slo.tbt_slowdown is not None:
            bits.append(f"TBT slowdown to {slo.tbt_slowdown * factor:.3g}x")
        if slo.tbt_ms is not None:
            bits.append(f"tbt_ms to {slo.tbt_ms * factor:.3g} ms")
        fixes.append("relax " + " and ".join(bits))
    sustainable = max_rate_per_s(tiers, demand, slo, settings, ref)
    if sustainable > 0:
        fixes.append(
            f"lower workload.arrival_rate_per_s to <= {sustainable:.4g} conv/s, the most this fleet sustains "
            "(modelled; `orchestrator plan --max-rate` plans for it)"
        )
    if not fixes:
        fixes.append("add a tier that can hold the conversations")
    message = ". ".join(parts) + ". To fix: " + ", or ".join(fixes) + "."
    if unusable and not shortfalls:
        message += " Unusable instance shapes: " + "; ".join(unusable[:4]) + "."
    return Diagnosis(shortfalls, add, factor, unusable, message, sustainable)
