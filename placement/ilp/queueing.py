"""Queueing and operating points: the M/G/1 wait (Pollaczek-Khinchine mean, Kingman tail), the
per-conversation violation share, decode step and power at a batch, the standalone reference (placement.ilp
docstring: "Per-conversation SLO model")."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from placement.ilp.values import Demand, Reference, Slo
from tiers.perf import TierModel


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


def erlang_c(servers: int, rho: float) -> float:
    """P(wait > 0) in an M/M/c queue at utilisation rho per server (Erlang's C formula); rho for c = 1."""
    c = max(1, int(servers))
    if rho <= 0:
        return 0.0
    if rho >= 1:
        return 1.0
    a = c * rho
    term, acc = 1.0, 1.0  # a^k / k!, summed for k < c
    for k in range(1, c):
        term *= a / k
        acc += term
    top = term * a / c / (1.0 - rho)  # a^c / c! x 1 / (1 - rho)
    return top / (acc + top)


def wait_tail(rho: float, s_mean: float, s2_mean: float, servers: int = 1) -> tuple[float, float]:
    """(P(W > 0), theta) of the M/G/c FCFS wait with the exponential tail P(W > w) = P(W > 0) exp(-w / theta).

    c = 1: P(W > 0) = rho, theta = E[W] / rho = S2 / (2 S (1 - rho)) (Pollaczek-Khinchine mean, Kingman's
    tail). c > 1 (a pool whose turn-1 prompts go to the instance with the least queued work: least-work-left
    routing is the central FCFS queue of c servers): Erlang's C for P(W > 0) and the Lee-Longton scaling of
    the M/M/c conditional wait, theta = S2 / (2 S) / (c (1 - rho))."""
    if rho <= 0 or s_mean <= 0:
        return 0.0, 1.0
    if rho >= 1:
        return 1.0, math.inf
    c = max(1, int(servers))
    return erlang_c(c, rho), s2_mean / (2.0 * s_mean * c * (1.0 - rho))


def violation_share(
    rho: float, s_mean: float, s2_mean: float, budgets_s: np.ndarray, servers: int = 1
) -> float:
    """Share of conversations whose wait exceeds their own budget: mean_i P(W > b_i) (1 when b_i < 0)."""
    p0, theta = wait_tail(rho, s_mean, s2_mean, servers)
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


Survival = Callable[[np.ndarray], np.ndarray]  # budget b (s) -> P(the part's random delay > b), elementwise


def mixture_quantile(
    parts: Sequence[tuple[float, float, float, float, np.ndarray, np.ndarray]]
    | Sequence[tuple[float, float, float, float, np.ndarray, np.ndarray, int]]
    | Sequence[tuple[float, float, float, float, np.ndarray, np.ndarray, int, Survival | None]],
    percentile: float,
) -> float:
    """Smallest x with sum_k w_k mean_i P(W_k > x scale_ki - c_ki) <= 1 - p/100 (weights normalised).

    parts: (weight w_k, rho_k, S_k, S2_k, c_k, scale_k) per group k of conversations (a prefill pool's, or
    the hybrid decoders' local prefills with rho 0); c_k: the conversations' fixed latency there; scale = 1
    gives the p-th percentile of TTFET in seconds, scale = T0_i that of the slowdown; an optional 7th
    element: the group's number of servers (M/G/c, :func:`wait_tail`; 1 when absent); an optional 8th: the
    survival function of the group's whole random delay, used instead of the M/G/c wait's when not None
    (placement.ilp.stepchain: the wait plus the decoder's steps).
    """
    q = 1.0 - percentile / 100.0
    wsum = sum(p[0] for p in parts) or 1.0

    def one(p: tuple, x: float) -> float:  # type: ignore[type-arg]
        surv = p[7] if len(p) > 7 else None
        if surv is not None:
            return float(np.mean(surv(x * p[5] - p[4])))
        return violation_share(p[1], p[2], p[3], x * p[5] - p[4], p[6] if len(p) > 6 else 1)

    def share(x: float) -> float:
        return sum(p[0] * one(p, x) for p in parts if len(p[4])) / wsum

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
