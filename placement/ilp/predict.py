"""Predictions of a solved plan: pools' operating points, watts, the TTFET / TBT percentiles (placement.ilp
docstring: "Per-conversation SLO model", Predictions)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from placement.ilp.batching import BatchLaw, decode_side_points, pool_batch_law
from placement.ilp.model import Solution
from placement.ilp.options import hybrid_split
from placement.ilp.prefillpool import pool_delay_sample
from placement.ilp.queueing import (
    _bisect_max,
    decode_power_at_w,
    decode_side_s,
    decode_step_s,
    mg1_wait_mean_s,
    mg1_wait_quantile_s,
    mixture_quantile,
    slo_targets,
    tbt_floor_s,
    wait_tail,
)
from placement.ilp.routing import near_local_rate, routed_stream
from placement.ilp.stepchain import StepChain, Survival
from placement.ilp.values import Demand, Option, Reference, Settings, Slo, TierSupply
from tiers.links import kv_transfer_time_s

# a group of conversations in the TTFET mixture (placement.ilp.queueing.mixture_quantile): weight, rho, S, S2,
# fixed latencies, mask or scale, servers, the survival of its random delay (None: the M/G/c wait's)
_Part = tuple[float, float, float, float, np.ndarray, np.ndarray, int, Survival | None]


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
    # decode pools: the integrated autocorrelation time of the step under the batch law (BatchLaw.tau_c_s;
    # 0 without a stationary law): the batch's relaxation, which a simulated steady state must outlast
    tau_c_s: float = 0.0


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


def _local_steps_s(dec: Option, batch: float, demand: Demand) -> np.ndarray:
    """step(L1_i prefilled next to the batch's decode) for every conversation of the sample."""
    b = max(1, round(batch))
    ctx = round(batch * demand.decode_context_tokens)
    return np.array(
        [dec.model.step_time_s(max(1, round(c.turn1_tokens)), 0, b, ctx) for c in demand.conv_shapes],
        dtype=float,
    )


def _near_chain(
    chain: StepChain,
    p_local: np.ndarray,
    d: float,
    demand: Demand,
    remote_mask: np.ndarray,
    decoders: int,
    parts: list[_Part],
    remote: dict[int, np.ndarray],
    pool_delay: dict[int, np.ndarray],
) -> StepChain:
    """The step chain a local prompt sees: its neighbours on its decoder at the routing's Palm rate
    (placement.ilp.routing; remote prompts admitted after the first prefill pool's delay) instead of the
    even split's; the even split's chain when there is one decoder or no prefill pool."""
    if decoders <= 1 or not remote:
        return chain
    j = min(remote)
    _, rho, s1, s2, c_i, _, ns, _ = parts[j]
    admit = np.zeros(len(remote_mask))
    admit[remote_mask] = c_i
    times, chosen, is_local = routed_stream(
        np.array([c.turn1_tokens for c in demand.conv_shapes], dtype=float),
        ~remote_mask,
        admit,
        demand.arrival_rate_per_s,
        decoders,
        d,
        demand.decode_tokens + demand.later_turns,
        pool_delay[j] if j in pool_delay else wait_tail(rho, s1, s2, ns),
    )
    return StepChain(p_local, near_local_rate(times, chosen, is_local, chain.mean_step_s), d)


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
    main_batch = 0.0
    main_k = 1
    remote: dict[int, np.ndarray] = {}  # parts of prefill pools -> their prompts' KV hand-off X_i
    pool_delay: dict[int, np.ndarray] = {}  # parts of prefill pools -> their delay sample beyond own prefill
    heaviest_d = -1.0
    worst_law: BatchLaw | None = None
    parts: list[_Part] = []
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
                    for c, k in zip(shapes, sel, strict=True)
                    if k
                ],
                dtype=float,
            )
            # a prefill pool is M/G/k (least-work routing); a colocated instance keeps its own
            # conversations (M/G/1 each)
            if o.role == "prefill":
                # the KV hand-off X_i of each prompt (added with the decoder's steps below)
                remote[len(parts)] = np.array(
                    [
                        kv_transfer_time_s(round(c.turn1_tokens), kvb, link)
                        for c, k in zip(shapes, sel, strict=True)
                        if k
                    ],
                    dtype=float,
                )
            s1, s2 = o.prefill_s, o.prefill2_s2
            if o.role == "prefill" and len(c_i):
                # the pool's service law over the conversations it serves (the sample whose budgets are
                # checked), not the ILP's quantile sample of turn-1 lengths: that one drops the top
                # 1 / (2 x its size) of a heavy tail, which carries much of S2 (fleet-single-turn: S2
                # 0.291 vs 0.323 s^2, the longest prompt 13,872 vs 22,030 tokens)
                s1, s2 = float(c_i.mean()), float((c_i**2).mean())
                rho = per * s1
            if o.role == "prefill" and len(c_i):
                # the pool's chunked steps and token routing (placement.ilp.prefillpool), for the hand-off
                served = np.array([c.turn1_tokens for c, x in zip(shapes, sel, strict=True) if x])
                pool_delay[len(parts)] = pool_delay_sample(served, load, k, o.model)
            parts.append((load, rho, s1, s2, c_i, sel, k if o.role == "prefill" else 1, None))
        law: BatchLaw | None = None
        if o.does_decode:
            batch, step = decode_operating_point(o, demand, per)
            # the batch law of the pool (placement.ilp.batching); the fluid point above where it has none
            law = pool_batch_law(o, demand, load, k)
            if law.stable:
                batch, step = law.mean_batch, law.step_tok_s
            kvts = demand.kv_decode_token_steps * step + demand.kv_gap_token_seconds
            kv_occ = per * kvts / o.kv_capacity_tokens if o.kv_capacity_tokens else 0.0
            shares = [kv_occ / settings.kv_occupancy_max, per / o.mu_tbt if o.mu_tbt > 0 else 0.0]
            if o.tail_busy_s > 0:
                shares.append(per * o.tail_busy_s / settings.tail_share_max)
            util = max([util, *shares])
            if step >= worst_step:
                worst_law = law if law is not None and law.stable else None
            worst_step = max(worst_step, step)
            worst_decode_side = max(worst_decode_side, decode_side_s(demand, step))
            if load > heaviest_d:
                heaviest_d, main_decoder = load, o
                main_batch, main_k = batch, k
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
        tau_c = law.tau_c_s if law is not None and law.stable else 0.0
        pools.append(PoolPrediction(o, k, load, util, kv_occ, batch, step, wait_p, wait_m, watts, tau_c))
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
    d_i = decode_side_points(demand, worst_step, worst_law)
    t0_i = np.asarray(ref.ttfet_i_s if ref.ttfet_i_s else (ref.ttfet_s,) * len(shapes), dtype=float)
    if main_decoder is not None:
        # turn-1 prompts reaching a decoder (placement.ilp docstring, "Hand-off"; placement.ilp.stepchain): a
        # local prompt waits for the step in progress and is prefilled in the next step together with the
        # local prompts that arrived during that step (R + d + p_i + S_M); a remote prompt's KV is admitted
        # at the end of the step in progress, transferred while the next step runs, joins the batch at its
        # end and its first token ends the step after (R1 + T_b + T_c; a longer transfer joins later)
        local = ~split.mask
        own = _local_steps_s(main_decoder, main_batch, demand)
        lam_dec = demand.arrival_rate_per_s * split.local_share / max(main_k, 1)
        # the decode part of a step: the planned step without the local prefills (they enter the chain)
        d = decode_step_s(main_decoder.model, demand, main_batch, local_tokens=0.0) if main_batch > 0 else 0.0
        base = main_decoder.model.decode_step_time_s(
            max(1, round(main_batch)), round(main_batch * demand.decode_context_tokens)
        )
        p_local = own[local] - base  # the local prompts' prefill parts of a mixed step
        chain = StepChain(p_local, lam_dec, d) if d > 0 else None
        spread: list[_Part] = []
        for j, (w, rho, s1, s2, c, m, ns, _) in enumerate(parts):
            x = remote.get(j)
            if x is None or chain is None:  # chain None: an idle decoder (no batch), only the transfer
                spread.append(parts[j] if x is None else (w, rho, s1, s2, c + x, m, ns, None))
                continue
            # a transfer longer than T_b joins at the first step boundary after it (decode steps of d)
            late = np.maximum(d * np.ceil(x / d) - d, 0.0)
            if j in pool_delay:
                surv = chain.handoff_survival_sample(pool_delay[j])
            else:
                surv = chain.handoff_survival(*wait_tail(rho, s1, s2, ns))
            spread.append((w, rho, s1, s2, c + late, m, ns, surv))
        near = None
        if split.local_share > 0 and chain is not None:
            # before the hand-off is added: parts[j][4] is still the prefill pool's own prefill times
            near = _near_chain(chain, p_local, d, demand, split.mask, main_k, parts, remote, pool_delay)
        parts = spread
        if near is not None:
            w_loc = demand.arrival_rate_per_s * split.local_share
            parts.append((w_loc, 0.0, 1.0, 1.0, d + p_local, local, 1, near.local_survival()))
    # each conversation at SPREAD_POINTS quantiles of its decode side (equal weights)
    npt = d_i.shape[1]
    full = [
        (w, rho, s1, s2, (c[:, None] + d_i[m]).ravel(), np.ones(int(m.sum()) * npt), ns, surv)
        for w, rho, s1, s2, c, m, ns, surv in parts
    ]
    ttfet_p = mixture_quantile(full, slo.percentile) if full else worst_decode_side
    full = [
        (w, rho, s1, s2, (c[:, None] + d_i[m]).ravel(), np.repeat(t0_i[m], npt), ns, surv)
        for w, rho, s1, s2, c, m, ns, surv in parts
    ]
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
