"""The tail of a decoder's running KV (constraint (4b), placement.ilp docstring "Constraints").

Constraint (4) checks the KV a decoder holds as a mean (Little's law: rate x KV-token-seconds <= kappa K).
The decode batch spreads (placement.ilp.batching: at the knife edge its law covers every batch up to the
cap), so a plan can meet (4) with a wide margin on the mean while its batch often needs more KV than the
instance has: examples/paper-a40-disagg.yaml's plan held 38% of its KV on average while one i.i.d. stream
in three reached the decoders' 308k tokens (~17.6 sequences), evicted histories and collapsed
(docs/planning.md, "paper-a40, the disaggregated plan at the burst rate").

The running sequences' KV on one instance with N sequences in its batch is S_N = c_1 + ... + c_N. The batch
law is a symmetric queue's (Kelly, Reversibility and Stochastic Networks, ch. 3): given N, the residents'
attained services are i.i.d. and each sits at a uniformly random step of a conversation drawn in proportion
to its steps, so c_i are i.i.d. with the workload's per-decode-token context moments (mean A / O, second
moment A2 / O, ``Demand.kv_decode_token_steps`` / ``kv_decode_token2_steps``); S_N is taken as normal with
mean N E[c] and variance N Var(c) (central limit; N ~ 10-40 where it matters). Histories of conversations
between turns are prefix-cache entries that the LRU evicts (a recompute later, not a blocked step), so only
the running sequences count here; (4) keeps the mean of both.

The bound (derived, not fitted): an arrival that meets its decoder's running KV beyond the capacity waits for
admission or is preempted and recomputed -- counted as missing its SLO. Poisson arrivals see the stationary
law (PASTA), so the share of conversations that meet it is P(S_N > K). The SLO lets 1 - p/100 of the
conversations miss (5% at p95), hence

    (4b)  P(S_N > K) <= 1 - p/100      under the batch law at l_j / n_j conversations/s per instance

with n = 1 (no pooling credit, as for (5): the capacity per instance then holds for any instance count, so
the constraint stays linear: l_j <= kv_tail_rate_j n_j).
"""

from __future__ import annotations

import math

import numpy as np

_BISECT_ITERS = 40


def conditional_tail(
    per_instance: np.ndarray, ctx_mean: float, ctx_var: float, capacity_tokens: float
) -> np.ndarray:
    """P(S_k > capacity_tokens) for each batch k of per_instance: S_k normal, mean k E[c], var k Var(c)."""
    k = np.asarray(per_instance, dtype=float)
    if capacity_tokens <= 0:
        return np.ones_like(k)
    mean = k * ctx_mean
    sd = np.sqrt(k * max(ctx_var, 0.0))
    z = (capacity_tokens - mean) / np.where(sd > 0, sd, 1.0) / math.sqrt(2.0)
    erfc = np.array([math.erfc(x) for x in z], dtype=float)
    return np.where(sd > 0, 0.5 * erfc, (mean > capacity_tokens).astype(float))


def kv_overflow_share(
    pi: np.ndarray, per_instance: np.ndarray, ctx_mean: float, ctx_var: float, capacity_tokens: float
) -> float:
    """P(the running sequences' KV of one instance > capacity_tokens) under the batch law pi over the batches
    per_instance (placement.ilp.batching.BatchLaw), each sequence's context i.i.d. (mean, variance)."""
    tail = conditional_tail(per_instance, ctx_mean, ctx_var, capacity_tokens)
    return float(np.clip((np.asarray(pi) * tail).sum(), 0.0, 1.0))


def kv_tail_rate(
    steps_s: np.ndarray,
    steps_per_conversation: float,
    ctx_mean: float,
    ctx_var: float,
    capacity_tokens: float,
    share_max: float,
) -> float:
    """The highest rate (conversations/s) one instance takes with P(running KV > capacity) <= share_max
    under its own batch law (n = 1: pi_b ~ rate^b prod_{j<=b} K step(j) / j); inf when the stability limit
    BATCH_CAP / (K step(BATCH_CAP)) keeps it there. The share rises with the rate (the law is stochastically
    increasing in it): bisection to 2^-40 of that limit."""
    k = steps_per_conversation
    cap = len(steps_s)
    if cap == 0 or k <= 0 or ctx_mean <= 0:
        return math.inf
    b = np.arange(0, cap + 1, dtype=float)
    c = np.concatenate(([0.0], np.cumsum(np.log(k * np.asarray(steps_s, dtype=float) / b[1:]))))
    tail = conditional_tail(b, ctx_mean, ctx_var, capacity_tokens)

    def share(rate: float) -> float:
        if rate <= 0:
            return float(tail[0])
        logp = b * math.log(rate) + c
        p = np.exp(logp - logp.max())
        return float((p * tail).sum() / p.sum())

    hi = cap / (k * float(steps_s[-1]))
    if share(hi * (1.0 - 1e-9)) <= share_max:
        return math.inf
    lo = 0.0
    if share(lo) > share_max:
        return 0.0
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        if share(mid) <= share_max:
            lo = mid
        else:
            hi = mid
    return lo
