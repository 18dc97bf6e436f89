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
)
from placement.ilp.values import Demand, Option, Reference, Settings, Slo, TierSupply
from tiers.links import kv_transfer_time_s


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


RESIDUAL_POINTS = 8  # equal-weight quantiles of a long step's residual (hybrid decoders' local prefills)


@dataclass(frozen=True, slots=True)
class _Residual:
    """The residual of the decoder step in progress when a turn-1 prompt reaches its decoder: a decode step
    (mean residual step / 2) or, with probability `long_share`, a local prefill step (length-biased, its
    residual uniform over it: `quantiles`, equal weights)."""

    step_s: float
    long_share: float
    quantiles: tuple[float, ...]

    @property
    def mean_s(self) -> float:
        q = float(np.mean(self.quantiles)) if self.quantiles else 0.0
        return (1.0 - self.long_share) * self.step_s / 2.0 + self.long_share * q

    def spread(self, base: np.ndarray, weight: float) -> list[tuple[float, np.ndarray]]:
        """(weight, base + one residual) for the decode-step case and each long-step quantile."""
        out = [(weight * (1.0 - self.long_share), base + self.step_s / 2.0)]
        for q in self.quantiles:
            out.append((weight * self.long_share / len(self.quantiles), base + q))
        return out


def _local_steps_s(dec: Option, batch: float, demand: Demand) -> np.ndarray:
    """step(L1_i prefilled next to the batch's decode) for every conversation of the sample."""
    b = max(1, round(batch))
    ctx = round(batch * demand.decode_context_tokens)
    return np.array(
        [dec.model.step_time_s(max(1, round(c.turn1_tokens)), 0, b, ctx) for c in demand.conv_shapes],
        dtype=float,
    )


def _residual(own_local: np.ndarray, local_rate_per_instance: float, step_s: float) -> _Residual:
    """The decoder's step residual (see _Residual); f = local rate per decoder x the local steps' mean."""
    if len(own_local) == 0 or local_rate_per_instance <= 0:
        return _Residual(step_s, 0.0, ())
    f = min(local_rate_per_instance * float(own_local.mean()), 0.9)
    u = (np.arange(64) + 0.5) / 64
    r = (own_local[:, None] * u[None, :]).ravel()
    w = np.repeat(own_local, len(u))
    order = np.argsort(r)
    cum = np.cumsum(w[order]) / w.sum()
    qs = tuple(
        float(r[order][min(int(np.searchsorted(cum, (j + 0.5) / RESIDUAL_POINTS)), len(r) - 1)])
        for j in range(RESIDUAL_POINTS)
    )
    return _Residual(step_s, f, qs)


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
    main_batch = main_step = 0.0
    main_k = 1
    remote: set[int] = set()  # parts of prefill pools (their KV is handed off to a decoder)
    heaviest_d = -1.0
    worst_law: BatchLaw | None = None
    parts: list[tuple[float, float, float, float, np.ndarray, np.ndarray, int]] = []
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
            # a prefill pool is M/G/k (least-work routing); a colocated instance keeps its own
            # conversations (M/G/1 each)
            if o.role == "prefill":
                remote.add(len(parts))
            parts.append((load, rho, o.prefill_s, o.prefill2_s2, c_i, sel, k if o.role == "prefill" else 1))
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
                main_batch, main_step, main_k = batch, step, k
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
        # turn-1 prompts reaching a decoder (placement.ilp docstring, "hand-off"): a local prompt is admitted
        # when the step in progress ends and prefilled in one step next to the batch's decode, which emits
        # its first token; a remote prompt's KV is admitted at the end of one step, transferred, joins the
        # batch at the end of another, and its first token ends the step after: residual + X + mean
        # residual + step on top of the prefill
        local = ~split.mask
        own = _local_steps_s(main_decoder, main_batch, demand)
        lam = demand.arrival_rate_per_s
        res = _residual(own[local], lam * split.local_share / max(main_k, 1), main_step)
        spread: list[tuple[float, float, float, float, np.ndarray, np.ndarray, int]] = []
        for j, (w, rho, s1, s2, c, m, ns) in enumerate(parts):
            if j in remote:
                spread.extend(
                    (wk, rho, s1, s2, ck, m, ns) for wk, ck in res.spread(c + res.mean_s + main_step, w)
                )
            else:
                spread.append((w, rho, s1, s2, c, m, ns))
        parts = spread
        if split.local_share > 0:
            parts.extend(
                (wk, 0.0, 1.0, 1.0, ck, local, 1)
                for wk, ck in res.spread(own[local], lam * split.local_share)
            )
    # each conversation at SPREAD_POINTS quantiles of its decode side (equal weights)
    npt = d_i.shape[1]
    full = [
        (w, rho, s1, s2, (c[:, None] + d_i[m]).ravel(), np.ones(int(m.sum()) * npt), ns)
        for w, rho, s1, s2, c, m, ns in parts
    ]
    ttfet_p = mixture_quantile(full, slo.percentile) if full else worst_decode_side
    full = [
        (w, rho, s1, s2, (c[:, None] + d_i[m]).ravel(), np.repeat(t0_i[m], npt), ns)
        for w, rho, s1, s2, c, m, ns in parts
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
