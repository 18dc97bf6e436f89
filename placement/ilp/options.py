"""The options of one solve and their coefficients (placement.ilp docstring: "Per-option coefficients"),
and the hybrid split of turn-1 prompts between prefillers and decoders."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from placement.ilp.batching import (
    BATCH_CAP,
    BatchLaw,
    capacity_law,
    decode_side_points,
    exogenous_prefill_s,
)
from placement.ilp.queueing import (
    _bisect_max,
    decode_power_at_w,
    decode_side_s,
    decode_step_s,
    rho_for_budgets,
    slo_targets,
    tail_token_s,
    ttfet_targets_s,
    turn1_token_s,
)
from placement.ilp.values import Demand, Option, Reference, Settings, Slo, TierSupply
from tiers.links import kv_transfer_time_s, link_spec
from tiers.perf import TierModel


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
    # step(b), b = 1..BATCH_CAP, of one instance (placement.ilp.batching): (decode role, colocated role)
    steps_s: tuple[np.ndarray, np.ndarray] = (np.zeros(0), np.zeros(0))


def _static(
    m: TierModel, link: str, demand: Demand, split: HybridSplit | None = None, colocated: bool = True
) -> _Static:
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
        steps_s=(
            _curve(m, demand, False, costs, split.local_tokens if split is not None else 0.0),
            # colocated: the batch's own curve step_d(b); its turn-1 prefills scale it with the rate
            # (placement.ilp.batching: step_d(b) / (1 - r e1))
            _curve(m, demand, False, costs, 0.0) if colocated else np.zeros(0),
        ),
    )


# batches at which the step curve is evaluated (every batch to 32, then every 8th: the tier model's step is
# close to linear in the batch there), interpolated to 1..BATCH_CAP
_CURVE_AT = np.unique(np.concatenate((np.arange(1, 33), np.arange(40, BATCH_CAP + 1, 8), [BATCH_CAP])))


def _curve(m: TierModel, demand: Demand, colo: bool, costs: tuple[float, float], loc: float) -> np.ndarray:
    at = _CURVE_AT.astype(float)
    vals = np.array([decode_step_s(m, demand, float(b), colo, costs, loc) for b in at], dtype=float)
    return np.interp(np.arange(1, BATCH_CAP + 1, dtype=float), at, vals)


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


def _compressed(values: np.ndarray, n: int) -> np.ndarray:
    """n equal-weight quantiles ((j + 1/2) / n) of `values`: the spread points of the conversations' budgets
    in as many values as there are conversations (the violation share is a mean over them)."""
    if len(values) <= n or n <= 0:
        return values
    idx = ((np.arange(n) + 0.5) / n * len(values)).astype(int)
    return np.sort(values)[idx]


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
    split = hybrid_split(demand, settings.local_prefill_below_tokens)
    if cache is None:
        cache = {}
    # each decode-capable model's batch law at its capacity for this tau (placement.ilp.batching): the
    # capacity of constraint (5), and the spread of the conversations' mean step the TTFET budgets allow for
    steps_conv = demand.decode_tokens + demand.later_turns
    laws: dict[tuple[int, int, bool], tuple[float, BatchLaw]] = {}
    for ti, t in enumerate(tiers):
        for mi, m in enumerate(t.models):
            st = cache.get((ti, mi))
            if st is None:
                st = cache[(ti, mi)] = _static(m, t.link, demand, split, "colocated" in t.roles)
            for colo in (False, True):
                if ("colocated" if colo else "decode") in t.roles:
                    exo = exogenous_prefill_s(m, demand) if colo else 0.0
                    laws[(ti, mi, colo)] = capacity_law(st.steps_s[int(colo)], steps_conv, tau_s, exo)
    targets = ttfet_targets_s(slo, ref)
    spread_dec = max(
        (law for (_, _, colo), (_, law) in laws.items() if not colo),
        key=lambda x: x.step_cv_tok,
        default=None,
    )
    # per-conversation TTFET budgets before the prefill side: bound_i - D_i(tau) at the spread's points
    room_i = (targets[:, None] - decode_side_points(demand, tau_s, spread_dec))[split.mask]
    # the prefilled conversations may miss at most (1 - p/100) / (1 - f) of theirs (locals assumed to meet
    # theirs: a short local prefill, no queue)
    q_pre = min(1.0, (1.0 - slo.percentile / 100.0) / max(1.0 - split.local_share, 1e-9))
    pct_pre = 100.0 * (1.0 - q_pre)
    out: list[Option] = []
    for ti, t in enumerate(tiers):
        spec = link_spec(t.link)
        for mi, m in enumerate(t.models):
            cap = m.cap_w
            st = cache.get((ti, mi))
            if st is None:
                st = cache[(ti, mi)] = _static(m, t.link, demand, split, "colocated" in t.roles)
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
                    room = room_i
                    if role == "colocated":
                        room = targets[:, None] - decode_side_points(demand, tau_s, laws[(ti, mi, True)][1])
                    budgets = _compressed(
                        (room - (st.s_i + (st.x_i if role == "prefill" else 0.0))[:, None]).ravel(),
                        len(st.s_i),
                    )
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
                    # (5): the rate at which the instance's token-weighted mean step, under its own batch
                    # law, reaches tau (the fluid point bmax / resid ignores the batch's swings)
                    mu = laws[(ti, mi, colo)][0] if bmax > 0 else 0.0
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
