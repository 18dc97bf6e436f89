"""Capacity planner: how many instances of each tier x power cap x TP size to run in each role (PuLP ILP).

Pure: inputs are frozen values (tier models, a workload summary, SLOs), output is a frozen solution. Must not
import fastapi, sqlalchemy, httpx, orchestrator, or read wall-clock time (the caller times the solve).

Modules (import from placement.ilp): values (inputs, Option), queueing (M/G/1 and M/G/c, operating points,
the standalone reference), batching (the decode batch's birth-death law), options (build_options, the
hybrid split), model (solver, objective, the ILP), predict (a solved plan's figures), search (modes x
levels, bound-and-prune, tier merging), capacity (max rate, bursts), diagnosis (infeasible fleets),
planning (plan, plan_with_reference, best_per_mode).

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
    mu_j           conversations/s one decoder sustains with its token-weighted mean step <= tau under
                   its own batch law (module batching: the birth-death chain of its running
                   conversations, n = 1 so no credit is taken for pooling); the fluid point B_j / R_j
                   ignores the batch's swings and certified plans on the knife edge       [``mu_tbt``]
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
    (5) TBT        l_j <= mu_j n_j                      (the batch law's mean step <= tau at l_j / n_j)
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
    the decode side at tau with the spread of a conversation's mean step that the decoder's batch law
    gives at its capacity (module batching); tool gaps and output lengths as in the trace (no prediction
    is used). The ILP keeps M/G/1 per instance (linear in n_j, conservative); the predictions below use
    M/G/k for a prefill pool of k instances.
    Decode batch (module batching): a decoder's running conversations form the birth-death chain with
    birth rate lam_j and death rate k / (K step_j(k / n_j)) (K = O + Kn steps in the batch; k spread over
    the pool's n_j instances by the least-loaded placement): a processor-sharing station whose speed
    depends on its population, with the product-form law pi_k ~ prod_{i<=k} lam K step(i / n) / i
    (insensitive to the distribution of K). Mean TBT = the token-weighted mean step; a conversation's mean
    step over its span T has CV = CV_tok(step) sqrt(g(T / tau_c)), tau_c the chain's integrated
    autocorrelation time (exact for birth-death chains), g(x) = 2 (x - 1 + e^-x) / x^2. A colocated
    instance's turn-1 prefills arrive with the conversations (e1 step-seconds each, whatever the batch), so
    its batch steps at step_d(k / n) / (1 - (lam / n) e1): the chain of step_d at the birth rate
    lam / (1 - lam e1 / n).
    Hand-off (predictions; module stepchain): a hybrid decoder's local prompt waits for the step in
    progress (R) and is prefilled in the next step together with the local prompts that arrived during
    that same step (S_M): d + p_i + R + S_M, R and M correlated through the length of the step in progress
    (a Markov chain on the prompts per step, Poisson arrivals, length-biased). A remote prompt's KV is
    admitted at the end of the step in progress (R1), transferred while the next step T_b runs, joins at
    its end and its first token ends the step after, T_c (R1 + T_b + T_c; T_b, T_c mixed steps of the same
    chain). Their laws enter the TTFET mixture as survival functions (a remote one convolved with its
    pool's delay: the pool's chunked steps on a reduced event model, module prefillpool). The local
    prompts' chain runs at the Palm rate of same-decoder neighbours that worst-fit routing gives (module
    routing: a placement raises the decoder's pinned KV at once, its resident KV only at admission, so
    close arrivals follow the leader), the hand-off's at the even split.
    Constraint: the share of conversations that miss their bound, (1/|I|) sum_i P(W > b_i - S_j(L1_i) -
    X_j(L1_i) - D_i(tau)) (1 when the argument is < 0), must be <= 1 - p/100; rho_j is the largest rho that
    keeps it there (bisection; the share rises with rho). The tail therefore comes from the workload's own
    distribution: short conversations (small T0_i) are the ones a queueing wait pushes over their bound.
    TBT: every conversation of a decoder sees its step, so the p-th percentile TBT slowdown is step / the
    (100 - p)-th percentile of t0_i; tau <= tbt_slowdown x that percentile (``tbt_floor_s``).
    E2E: E2E_i = TTFET_i + the final turn's decode; with both TTFET and TBT slowdowns <= their bounds, E2E's
    slowdown is <= the larger one (a mediant), so it needs no constraint of its own.
    Predictions (:func:`_predict`): the p-th percentile of TTFET (seconds) and of the TTFET slowdown are the
    quantiles of the mixture over the prefill pools (weighted by their load, M/G/k each), the hand-off
    residuals and the conversations (each at 9 quantiles of its mean step), at the planned operating
    point (the pool's batch law at its actual load, not the target tau).

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

from placement.errors import PlanningError
from placement.ilp.batching import (
    BATCH_CAP,
    BatchLaw,
    batch_law,
    capacity_law,
    exogenous_prefill_s,
    instance_steps_s,
    pool_batch_law,
)
from placement.ilp.capacity import Burst, _max_rate_model, burst, max_rate_of_counts, max_rate_per_s
from placement.ilp.diagnosis import Diagnosis, diagnose, elastic_shortfalls
from placement.ilp.model import (
    AUTO_HIGHS_MAX_GPUS,
    AUTO_HIGHS_MAX_SHAPES,
    MIP_REL_GAP,
    TIE_BREAK_W,
    Solution,
    _build,
    _c_stdout_to_stderr,
    _highs_available,
    _Model,
    _solver,
    _status_ok,
    dominated,
    instance_shapes,
    lp_bound,
    objective_coefficients,
    objective_constant,
    resolve_solver,
    solve,
)
from placement.ilp.options import HybridSplit, _Static, _static, build_options, hybrid_split
from placement.ilp.planning import ModeOutcome, best_per_mode, plan, plan_with_reference
from placement.ilp.predict import (
    PlanResult,
    PoolPrediction,
    _predict,
    conserve_threshold_tokens,
    decode_operating_point,
)
from placement.ilp.queueing import (
    _bisect_max,
    decode_power_at_w,
    decode_side_s,
    decode_sides_s,
    decode_step_s,
    erlang_c,
    mg1_wait_mean_s,
    mg1_wait_quantile_s,
    mixture_quantile,
    reference_latencies,
    rho_for_budgets,
    rho_for_wait,
    slo_targets,
    tail_token_s,
    tbt_floor_s,
    ttfet_targets_s,
    turn1_token_s,
    violation_share,
    wait_tail,
)
from placement.ilp.search import (
    _best,
    _levels,
    _Search,
    colocated_roles,
    merge_identical_tiers,
    reference_for,
    split_merged,
    variants,
)
from placement.ilp.values import (
    FAMILY_TEXT,
    ConvShape,
    Demand,
    Family,
    Objective,
    Option,
    Reference,
    Settings,
    Slo,
    TierSupply,
)

__all__ = [
    "AUTO_HIGHS_MAX_GPUS",
    "AUTO_HIGHS_MAX_SHAPES",
    "BATCH_CAP",
    "FAMILY_TEXT",
    "MIP_REL_GAP",
    "TIE_BREAK_W",
    "BatchLaw",
    "Burst",
    "ConvShape",
    "Demand",
    "Diagnosis",
    "Family",
    "HybridSplit",
    "ModeOutcome",
    "Objective",
    "Option",
    "PlanResult",
    "PlanningError",
    "PoolPrediction",
    "Reference",
    "Settings",
    "Slo",
    "Solution",
    "TierSupply",
    "_Model",
    "_Search",
    "_Static",
    "_best",
    "_bisect_max",
    "_build",
    "_c_stdout_to_stderr",
    "_highs_available",
    "_levels",
    "_max_rate_model",
    "_predict",
    "_solver",
    "_static",
    "_status_ok",
    "batch_law",
    "best_per_mode",
    "build_options",
    "burst",
    "capacity_law",
    "colocated_roles",
    "conserve_threshold_tokens",
    "decode_operating_point",
    "decode_power_at_w",
    "decode_side_s",
    "decode_sides_s",
    "decode_step_s",
    "diagnose",
    "dominated",
    "elastic_shortfalls",
    "erlang_c",
    "exogenous_prefill_s",
    "hybrid_split",
    "instance_shapes",
    "instance_steps_s",
    "lp_bound",
    "max_rate_of_counts",
    "max_rate_per_s",
    "merge_identical_tiers",
    "mg1_wait_mean_s",
    "mg1_wait_quantile_s",
    "mixture_quantile",
    "objective_coefficients",
    "objective_constant",
    "plan",
    "plan_with_reference",
    "pool_batch_law",
    "reference_for",
    "reference_latencies",
    "resolve_solver",
    "rho_for_budgets",
    "rho_for_wait",
    "slo_targets",
    "solve",
    "split_merged",
    "tail_token_s",
    "tbt_floor_s",
    "ttfet_targets_s",
    "turn1_token_s",
    "variants",
    "violation_share",
    "wait_tail",
]
