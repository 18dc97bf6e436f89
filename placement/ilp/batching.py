"""The decode batch of a pool as a birth-death process (placement.ilp docstring: "Decode batch").

A decoder's running conversations share its steps: in a batch of N each conversation advances one token per
step of step(N) seconds. A conversation is in the batch for K = O + Kn steps (its decode tokens and one step
per later turn's incremental prefill; tool gaps hold KV, not batch slots). That is a processor-sharing
station whose speed depends on its population, and with Poisson conversation arrivals its population is the
birth-death chain

    birth rate  lam                     (conversations/s into the pool)
    death rate  k / (K step(k / n))     (k conversations in the pool, spread evenly over its n instances:
                                         the policies place turn 1 on the least-loaded instance)

whose stationary law pi_k is proportional to prod_{j<=k} lam K step(j / n) / j (a symmetric queue: the law
does not depend on the distribution of K, only on its mean; Kelly, Reversibility and Stochastic Networks,
ch. 3). With a constant step it is Poisson(lam K step), the M/G/inf law; a step that grows with the batch
widens it, and as lam K approaches the pool's token throughput n k / step(k) at large k the law spreads
over every batch up to the cap: the knife edge where the mean batch B = lam K step(B) of the fluid
fixed point says nothing about the batch a conversation meets.

What the law gives the planner (every figure modelled):
- the mean batch per instance and the token-weighted mean step E_tok[step] = E[N] / E[N / step(N)]
  (each token of the pool is a step its conversation waited for: the mean TBT);
- the spread of the step seen by tokens, and its integrated autocorrelation time in seconds,
  tau_c = sum_k G(k)^2 / (pi_k lam) / Var_pi(step),  G(k) = sum_{j<=k} pi_j (step_j - E_pi step),
  exact for a reversible birth-death chain (the Poisson-equation form of the asymptotic variance of a time
  average); a conversation whose tokens span T seconds sees the mean of step over its span, whose
  variance is Var_tok(step) g(T / tau_c), g(x) = 2 (x - 1 + e^-x) / x^2 (exponential autocorrelation with
  that integrated time): long conversations average the batch's swings out, short ones meet one batch.

A colocated instance also prefills its conversations' turn-1 prompts, chunked into steps of their own.
That work arrives with the conversations, r per second per instance, each e1 = L1 x turn1_token_s seconds
of step time, whatever the batch: the instance spends the share u = r e1 of its time on it and steps its
batch in the rest, so each token of a batch of b waits step_d(b) / (1 - u) on average (step_d: the
decode step with the later turns' chunked prefills, which do belong to the batch's conversations). In the
chain that is the decode-only chain at the birth rate r / (1 - u), its token-weighted mean step divided
by 1 - u (:func:`colocated_steps_s`, :func:`capacity_law` with `exo_s`). The fluid point is the same as
pricing each conversation's prefill over its own tokens, step_d(B) + B (L1 / O) turn1_token_s (the model
before, at the same mean batch B = r K step), but that charged a batch of b with b conversations'
prefills, so the step rose with the batch faster than the work did: the law spread wider and its mean
step reached the target at a lower rate (examples/paper-a40.yaml, 4 colocated A40 at 300 W: the capacity
at the 34.9 ms level rose 0.206 -> 0.224 conv/s per instance, docs/planning.md).

The chain stops at BATCH_CAP sequences per instance; beyond it conversations wait and the pool serves at
its cap's rate. When lam K step(cap) / cap >= 1 the chain has no stationary law: the pool cannot deliver
the tokens (``stable`` False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from placement.ilp.queueing import decode_step_s, turn1_token_s
from placement.ilp.values import Demand, Option
from tiers.perf import TierModel

# vLLM's default max_num_seqs (256), which the simulator also runs with (orchestrator.sim.options
# DEFAULT_MAX_SEQS): at most this many sequences share one instance's step.
BATCH_CAP = 256


@dataclass(frozen=True, slots=True)
class BatchLaw:
    """The stationary decode batch of one pool (per instance)."""

    stable: bool
    mean_batch: float  # E[N] per instance
    step_tok_s: float  # token-weighted mean step (mean TBT)
    step_cv_tok: float  # coefficient of variation of the step a token waits for
    tau_c_s: float  # integrated autocorrelation time of the step, seconds
    empty_share: float  # P(an instance has no running conversation)
    pi: np.ndarray  # stationary law of the pool's total population k = 0..n BATCH_CAP
    per_instance: np.ndarray  # k / n for each state

    def span_cv(self, span_s: np.ndarray) -> np.ndarray:
        """CV of the mean step over a conversation's span of `span_s` seconds (its tokens and gaps)."""
        if self.tau_c_s <= 0 or self.step_cv_tok <= 0:
            return np.zeros_like(span_s, dtype=float)
        x = np.maximum(np.asarray(span_s, dtype=float), 1e-9) / self.tau_c_s
        xs = np.maximum(x, 1e-4)
        g = np.where(x < 1e-4, 1.0 - x / 3.0, 2.0 * (xs - 1.0 + np.exp(-xs)) / (xs * xs))
        return self.step_cv_tok * np.sqrt(np.clip(g, 0.0, 1.0))


def instance_steps_s(
    opt: Option, demand: Demand, cap: int = BATCH_CAP, rate_per_instance: float = 0.0
) -> np.ndarray:
    """step(b) for b = 1..cap conversations on one instance of `opt` (the ILP's step curve); a colocated
    instance's at `rate_per_instance` conversations/s (module docstring: step_d(b) / (1 - r e1))."""
    if opt.role == "colocated":
        return colocated_steps_s(opt.model, demand, rate_per_instance, cap)
    return np.array(
        [
            decode_step_s(opt.model, demand, float(b), False, local_tokens=opt.local_tokens)
            for b in range(1, cap + 1)
        ],
        dtype=float,
    )


def exogenous_prefill_s(m: TierModel, demand: Demand) -> float:
    """e1: step seconds of one conversation's turn-1 prefill chunked into a colocated instance's steps."""
    return demand.turn1_mean_tokens * turn1_token_s(m, demand)


def colocated_steps_s(
    m: TierModel, demand: Demand, rate_per_instance: float, cap: int = BATCH_CAP
) -> np.ndarray:
    """step_d(b) / (1 - r e1), b = 1..cap: the mean time per token of a colocated batch of b at r conv/s per
    instance (module docstring); inf where the turn-1 prefills alone fill the instance (r e1 >= 1)."""
    dec = np.array([decode_step_s(m, demand, float(b), False) for b in range(1, cap + 1)], dtype=float)
    free = 1.0 - rate_per_instance * exogenous_prefill_s(m, demand)
    return dec / free if free > 0 else np.full(cap, math.inf)


def batch_law(
    steps_s: np.ndarray, rate_per_s: float, steps_per_conversation: float, instances: int
) -> BatchLaw:
    """The pool's batch law (module docstring). steps_s: step(b) for b = 1..cap on one instance."""
    n = max(1, int(instances))
    cap = len(steps_s)
    kk = np.arange(1, n * cap + 1, dtype=float)
    per = kk / n
    step_k = np.interp(per, np.arange(1, cap + 1, dtype=float), steps_s)
    ratio = rate_per_s * steps_per_conversation * step_k / kk
    last = float(ratio[-1])
    logp = np.concatenate(([0.0], np.cumsum(np.log(np.maximum(ratio, 1e-300)))))
    logp -= logp.max()
    pi = np.exp(logp)
    pi /= pi.sum()
    per_all = np.concatenate(([0.0], per))
    st_all = np.concatenate(([0.0], step_k))
    mean_b = float((pi * per_all).sum())
    # tokens per second in state k: k / step; a token's step is weighted by them
    tok = pi[1:] * kk / step_k
    if tok.sum() <= 0:
        return BatchLaw(last < 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, pi, per_all)
    e_tok = float((tok * step_k).sum() / tok.sum())
    v_tok = float((tok * step_k**2).sum() / tok.sum() - e_tok**2)
    # autocorrelation time of f(k) = step in state k (0 when empty: no token waits then; the variance of a
    # conversation's mean step is scaled from the token view, the time scale from the chain)
    f = st_all
    e_f = float((pi * f).sum())
    v_f = float((pi * f**2).sum() - e_f**2)
    tau = 0.0
    if v_f > 0 and rate_per_s > 0:
        tau = _integrated_time_s(pi, f - e_f, rate_per_s) / v_f
    k_all = np.arange(0, n * cap + 1, dtype=float)
    empty = float((pi * np.maximum(n - k_all, 0.0)).sum() / n)  # share of the pool's instances empty
    return BatchLaw(
        stable=last < 1.0,
        mean_batch=mean_b,
        step_tok_s=e_tok,
        step_cv_tok=math.sqrt(max(v_tok, 0.0)) / e_tok if e_tok > 0 else 0.0,
        tau_c_s=tau,
        empty_share=empty,
        pi=pi,
        per_instance=per_all,
    )


def _integrated_time_s(pi: np.ndarray, dev: np.ndarray, birth_rate: float) -> float:
    """sum_k G(k)^2 / (pi_k birth_rate), G(k) = sum_{j<=k} pi_j dev_j (module docstring: tau_c x Var).

    G(k) also equals -sum_{j>k} pi_j dev_j (the deviations sum to 0 under pi). Summed from the left, the
    rounding error of G in the tail (~1e-17 x the terms' scale) is divided by a vanishing pi_k and blows up
    (the astronomically large tau_c of every fleet before this: 1e40 on paper-a40); so G is summed from the
    left up to the median of pi and from the right beyond it, each side over the states where it is small.
    """
    terms = pi * dev
    left = np.cumsum(terms)
    right = -(np.cumsum(terms[::-1])[::-1] - terms)  # -sum_{j>k}
    g = np.where(np.cumsum(pi) <= 0.5, left, right)
    keep = pi > 1e-300
    return float((g[keep] ** 2 / (pi[keep] * birth_rate)).sum())


def pool_batch_law(opt: Option, demand: Demand, load_per_s: float, instances: int) -> BatchLaw:
    """batch_law for `instances` instances of `opt` carrying `load_per_s` conversations/s."""
    k = demand.decode_tokens + demand.later_turns
    per = load_per_s / max(1, int(instances))
    return batch_law(instance_steps_s(opt, demand, rate_per_instance=per), load_per_s, k, instances)


def capacity_law(
    steps_s: np.ndarray, steps_per_conversation: float, tau_s: float, exo_s: float = 0.0
) -> tuple[float, BatchLaw]:
    """(rate, law): the highest conversation rate one instance takes with its token-weighted mean step
    <= tau_s under its own batch law (n = 1: no pooling credit, so the ILP's capacity holds for any
    instance count), and the law at that rate. The mean step rises with the rate; found on two
    64-point grids up to the stability limit (resolution 1/4096 of it).

    exo_s: e1 of a colocated instance (module docstring): steps_s is then its batch's own curve step_d(b)
    and a rate r runs it as step_d(b) / (1 - r e1), the chain of step_d at the rate r / (1 - r e1); the
    stability limit BATCH_CAP / (K step_d(BATCH_CAP)) = h in that rate is r = h / (1 + h e1)."""
    cap = len(steps_s)
    k = steps_per_conversation
    if cap == 0 or k <= 0 or steps_s[0] > tau_s:
        return 0.0, batch_law(steps_s, 0.0, max(k, 1.0), 1)
    h = cap / (k * float(steps_s[-1]))
    hi = h / (1.0 + h * exo_s)
    kk = np.arange(1, cap + 1, dtype=float)
    c = np.concatenate(([0.0], np.cumsum(np.log(k * steps_s / kk))))
    n_all = np.arange(0, cap + 1, dtype=float)
    inv = np.concatenate(([0.0], kk / steps_s))

    def mean_steps(rates: np.ndarray) -> np.ndarray:
        free = 1.0 - rates * exo_s
        logp = n_all[None, :] * np.log(rates / free)[:, None] + c[None, :]
        logp -= logp.max(axis=1, keepdims=True)
        p = np.exp(logp)
        return (p * n_all).sum(axis=1) / np.maximum((p * inv).sum(axis=1), 1e-300) / free

    lo, top = 0.0, hi
    for _ in range(2):
        grid = np.linspace(lo, top, 65)[1:]
        grid = grid[grid < hi]
        ok = mean_steps(grid) <= tau_s
        if not ok.any():
            top = float(grid[0]) if len(grid) else top
            continue
        last = int(np.nonzero(ok)[0][-1])
        lo = float(grid[last])
        top = float(grid[last + 1]) if last + 1 < len(grid) else min(top, hi)
    return lo, batch_law(steps_s / (1.0 - lo * exo_s), lo, k, 1)


# a conversation's mean step over its span is modelled as normal around the pool's token-weighted mean step
# (CV from placement.ilp.batching.BatchLaw.span_cv); its decode side enters the TTFET mixture at these
# equal-weight quantiles of that normal ((j + 1/2) / 9, j = 0..8)
SPREAD_POINTS = 9
_Z = np.array([float(NormalDist().inv_cdf((j + 0.5) / SPREAD_POINTS)) for j in range(SPREAD_POINTS)])


def decode_side_points(demand: Demand, step_s: float, law: BatchLaw | None) -> np.ndarray:
    """D_i at the SPREAD_POINTS quantiles of conversation i's mean step: (O_b,i + Kn_i) step_i + Gap_i,
    shape (conversations, points); one column repeated when there is no batch law."""
    sh = demand.conv_shapes
    steps = np.array([c.decode_before_final + c.later_turns for c in sh], dtype=float)
    gaps = np.array([c.gap_s for c in sh], dtype=float)
    cv = np.zeros(len(sh)) if law is None else law.span_cv(steps * step_s + gaps)
    factor = np.maximum(1.0 + cv[:, None] * _Z[None, :], 0.05)
    return steps[:, None] * step_s * factor + gaps[:, None]
