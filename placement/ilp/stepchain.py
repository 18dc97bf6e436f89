"""The hybrid decoder's step chain: how long a local turn-1 prompt waits on its decoder before its first token
(placement.ilp docstring, "Hand-off"; docs/planning.md, "SLO model").

A hybrid decoder prefills the short turn-1 prompts itself, as chunked prefill inside its steps (vLLM's
continuous batching; orchestrator/sim/steps.py steps the same way): a prompt that arrives while a step runs
is admitted at that step's end, and every prompt admitted there is prefilled in the *same* next step, whose
length is the decode step plus the prefill work of all of them (tiers.steps.prefill_step_time_s). A local
prompt's time to first token is therefore

    TTFT_i = R + d + p_i + sum_{m <= M} p_m,

d the decode part of a step, p_x = step(L_x next to the batch) - d the prefill part of prompt x, R the
residual of the step in progress at its arrival, and M the other local prompts that arrived during that
same step (they share its next step). R and M are correlated through the length T of the step in
progress: a long step (itself a mixed step) leaves a long residual *and* collects more prompts for the
next one. The model before this module took R as the residual alone and the mixed step as the prompt's
own (M = 0), which on examples/fleet-single-turn.yaml put the local prompts' TTFT at p95 / p99 0.19 /
0.30 s... of which the simulated p99 was 0.50 s (docs/planning.md, "How close the model is").

Model (exact for the chain below, no fitted constant):
- local prompts arrive at each decoder as a Poisson stream of rate lam (the pool's local arrivals split
  evenly: the policies balance turn 1);
- step n+1 prefills the K_{n+1} prompts that arrived during step n: T = d + S_K, S_K the sum of K
  independent prefill parts drawn from the local prompts' sample, and K_{n+1} | T_n ~ Poisson(lam T_n): a
  Markov chain on K whose stationary law pi_K is solved directly (K truncated at K_MAX, the last state
  lumping the rest);
- a prompt arrives in a step of class K with probability ~ pi_K E[T_K] (length biasing: time, not step,
  average), at a uniform point of it (R = U T), and by Poisson independence the other arrivals in that
  step are Poisson(lam T) (Slivnyak: independent of the tagged one);
- Y = R + S_M is tabulated over quantile points of T and S_M (QUANTILE_POINTS each, residual at
  RESIDUAL_GRID uniform points) and returned as equal-weight quantiles.
Assumptions: the decode part d is the planned mean step (the batch's swings enter the TTFET mixture through
the decode side, module batching); the prompts of one step always fit the chunked-prefill token budget
together (on examples/fleet-single-turn.yaml three prompts under 3,024 tokens fit the simulator's default
8,192-token budget, and P(K >= 3) < 1e-3 per step: the room in the budget is not what the tail waits for);
the decoder never idles (a running batch); remote prompts' KV hand-offs take no prefill work on it.
"""

from __future__ import annotations

import math

import numpy as np

K_MAX = 8  # prompts per step tracked by the chain; the last state lumps K >= K_MAX (P < 1e-6 on the fleets)
QUANTILE_POINTS = 32  # equal-weight quantile points of each step-length / prefill-sum distribution
RESIDUAL_GRID = 16  # uniform points of the residual within a step


def _compress(values: np.ndarray, n: int = QUANTILE_POINTS) -> np.ndarray:
    """n equal-weight quantiles ((j + 1/2) / n) of `values` (values itself when it has <= n points)."""
    if len(values) <= n:
        return np.sort(values)
    return np.quantile(values, (np.arange(n) + 0.5) / n)


def _poisson_pmf(k: int, mean: np.ndarray) -> np.ndarray:
    return np.exp(-mean) * mean**k / math.factorial(k)


def _poisson_to(kmax: int, mean: np.ndarray) -> np.ndarray:
    """P(N = k) for k < kmax and P(N >= kmax) in the last row, N ~ Poisson(mean), per element of mean."""
    rows = [_poisson_pmf(k, mean) for k in range(kmax)]
    rows.append(np.clip(1.0 - np.sum(rows, axis=0), 0.0, 1.0))
    return np.array(rows)


def prefill_sums(parts_s: np.ndarray, kmax: int = K_MAX) -> list[np.ndarray]:
    """S_k for k = 0..kmax: quantile points of the sum of k independent prefill parts (k-fold convolution of
    the sample, compressed to QUANTILE_POINTS after each addition)."""
    p = _compress(np.asarray(parts_s, dtype=float))
    out = [np.zeros(1)]
    for _ in range(kmax):
        out.append(_compress((out[-1][:, None] + p[None, :]).ravel()))
    return out


def stationary_law(step_s: float, rate_per_s: float, sums: list[np.ndarray]) -> np.ndarray:
    """pi_K: stationary law of the number of local prompts a step prefills (the chain K_{n+1} | K_n ~
    Poisson(lam (d + S_{K_n})), the last state lumping K >= K_MAX)."""
    kmax = len(sums) - 1
    trans = np.zeros((kmax + 1, kmax + 1))
    for j, s in enumerate(sums):
        trans[j] = _poisson_to(kmax, rate_per_s * (step_s + s)).mean(axis=1)
    # pi = pi P: solve (P^T - I) pi = 0 with sum(pi) = 1
    a = np.vstack([trans.T - np.eye(kmax + 1), np.ones(kmax + 1)])
    b = np.zeros(kmax + 2)
    b[-1] = 1.0
    pi = np.linalg.lstsq(a, b, rcond=None)[0]
    pi = np.clip(pi, 0.0, None)
    return np.asarray(pi / pi.sum())


def local_wait_quantiles(parts_s: np.ndarray, rate_per_s: float, step_s: float, points: int) -> np.ndarray:
    """`points` equal-weight quantiles of Y = R + S_M (module docstring): a local prompt's time to first
    token beyond its own mixed step d + p_i."""
    parts = np.asarray(parts_s, dtype=float)
    if len(parts) == 0 or rate_per_s <= 0 or step_s <= 0:
        u = (np.arange(points) + 0.5) / points
        return u * max(step_s, 0.0)  # only the residual of a decode step, uniform over it
    sums = prefill_sums(parts)
    pi = stationary_law(step_s, rate_per_s, sums)
    kmax = len(sums) - 1
    u = (np.arange(RESIDUAL_GRID) + 0.5) / RESIDUAL_GRID
    vals: list[np.ndarray] = []
    wts: list[np.ndarray] = []
    for k, s in enumerate(sums):
        t = step_s + s  # lengths of a step prefilling k prompts (equal-weight points)
        wt = pi[k] * t / len(t)  # length-biased: the step a prompt arrives in
        pm = _poisson_to(kmax, rate_per_s * t)  # (kmax + 1, len(t)): the others arriving in it
        for m, sm in enumerate(sums):
            y = t[:, None, None] * u[None, :, None] + sm[None, None, :]
            w = (wt * pm[m])[:, None, None] / (len(u) * len(sm))
            vals.append(y.ravel())
            wts.append(np.broadcast_to(w, y.shape).ravel())
    v = np.concatenate(vals)
    w = np.concatenate(wts)
    order = np.argsort(v)
    cum = np.cumsum(w[order])
    cum /= cum[-1]
    idx = np.minimum(np.searchsorted(cum, (np.arange(points) + 0.5) / points), len(v) - 1)
    return np.asarray(v[order][idx])
