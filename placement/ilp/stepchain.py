"""The hybrid decoder's step chain: how long a turn-1 prompt waits on its decoder for its first token
(placement.ilp docstring, "Hand-off"; docs/planning.md, "SLO model").

A hybrid decoder prefills the short turn-1 prompts itself, as chunked prefill inside its steps (vLLM's
continuous batching; orchestrator/sim/steps.py steps the same way): a prompt that arrives while a step runs
is admitted at that step's end, and every prompt admitted there is prefilled in the *same* next step, whose
length is the decode step plus the prefill work of all of them (tiers.steps.prefill_step_time_s). A local
prompt's time to first token is therefore

    TTFT_i = d + p_i + Y,   Y = R + S_M,

d the decode part of a step, p_x = step(L_x next to the batch) - d the prefill part of prompt x, R the
residual of the step in progress at its arrival, and S_M the prefill parts of the M other local prompts
that arrived during that same step (they share its next step). R and M are correlated through the length T
of the step in progress: a long step (itself a mixed step) leaves a long residual *and* collects more
prompts for the next one. A remote prompt's KV, handed off when its prefill ends, is admitted at the end of
the decoder's step in progress (R1), transferred while the next step T_b runs, joins the batch at T_b's end
and gets its first token at the end of the step after, T_c: H = R1 + T_b + T_c (the transfer is hidden
under T_b when shorter). T_b's and T_c's prefill work are again the local prompts that arrived during the
step before each.

Before this module the planner took Y as the residual alone (M = 0) and H as R1 + X + mean residual + the
mean step. On examples/fleet-single-turn.yaml (3 hybrid decoders, ~0.66 local prompts/s each; seeds 0-2,
steady state) the simulated Y has p50 / p90 / p95 / p99 0.023 / 0.141 / 0.199 / 0.300 s (6.4% of the local
prompts shared their prefill step with another), the residual alone 0.023 / 0.037 / 0.113 / 0.217 s, this
chain 0.024 / 0.096 / 0.177 / 0.284 s; the simulated H 0.096 / 0.229 / 0.278 / 0.415 s, the old hand-off
0.114 / 0.133 / 0.211 / 0.307 s, this chain 0.105 / 0.213 / 0.284 / 0.418 s (at the planned d = 40.9 ms).

Model (exact for the chain below, up to a time grid of d / CELLS_PER_STEP; no fitted constant):
- local prompts arrive at each decoder as a Poisson stream of rate lam. The split is even on average but
  not independent: worst-fit on free KV sends consecutive arrivals to the same decoder more often than
  1 / n (0.66 vs 1/3 within 0.1 s on fleet-single-turn; with the even split's lam the chain co-batched
  local prompts 4.1% of the time, the simulator 10.6%). So the planner builds two chains: the local prompts'
  at the Palm rate of same-decoder neighbours (placement.ilp.routing: what a tagged local prompt sees,
  1.42/s vs the even 0.66/s there; the chain at that rate overstates an event simulation's Y tail by
  7-11%, tests/placement/test_routing_memory.py), the hand-off's at the even split's lam (a remote
  prompt's KV arrives seconds after its placement, when the routing's memory has gone);
- step n+1 prefills the K_{n+1} prompts that arrived during step n: T = d + S_K, S_K the sum of K
  independent prefill parts drawn from the local prompts' sample, and K_{n+1} | T_n ~ Poisson(lam T_n): a
  Markov chain on K whose stationary law pi_K is solved directly (K truncated at K_MAX, the last state
  lumping the rest);
- a prompt (or a remote prefill's end) falls in a step with probability ~ its length (length biasing:
  time, not step, average), at a uniform point of it, and by Poisson independence the other local
  arrivals in that step are Poisson(lam T) (Slivnyak: independent of the tagged one);
- the laws of Y and H are computed on the grid by Fourier transforms; the TTFET mixture
  (placement.ilp.queueing.mixture_quantile) uses their survival functions, for a remote prompt convolved
  with its prefill pool's delay: the sample of placement.ilp.prefillpool (the pool's chunked steps;
  handoff_survival_sample) where the planner has one, else the M/G/k wait (P(W > w) = P(W > 0)
  exp(-w / theta), placement.ilp.queueing.wait_tail).
Assumptions: d is the planned decode step without the local prefills (placement.ilp.queueing.decode_step_s
with local_tokens 0; the batch's swings enter the TTFET mixture through the decode side, module batching);
the prompts of one step always fit the chunked-prefill token budget together (on fleet-single-turn three
prompts under 3,024 tokens fit the simulator's default 8,192-token budget, and P(K >= 3) < 1e-3 per step:
the room in the budget is not what the tail waits for); the decoder never idles (a running batch); remote
KV hand-offs take no prefill work on it; a transfer longer than T_b joins at the first boundary after it as
if the steps were decode steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

K_MAX = 8  # prompts per step tracked by the chain; the last state lumps K >= K_MAX (P < 1e-6 on the fleets)
GRID = 1 << 15  # most cells of the time grid, which spans 3 (d + K_MAX x the longest prefill part)
CELLS_PER_STEP = 32  # cells per decode step d (a coarser grid when that needs more than GRID cells)
NEGLIGIBLE = 1e-12  # a class of the chain with less probability than this is skipped

Survival = Callable[[np.ndarray], np.ndarray]  # budget b (s) -> P(the delay > b), elementwise


def _poisson_to(kmax: int, mean: np.ndarray) -> np.ndarray:
    """P(N = k) for k < kmax and P(N >= kmax) in the last row, N ~ Poisson(mean), per element of mean."""
    rows = [np.exp(-mean) * mean**k / math.factorial(k) for k in range(kmax)]
    rows.append(np.clip(1.0 - np.sum(rows, axis=0), 0.0, 1.0))
    return np.array(rows)


def _on_grid(cells: np.ndarray, n: int) -> np.ndarray:
    """pmf on n cells of equally likely positions given in cells (fractional: split between neighbours)."""
    x = np.clip(np.asarray(cells, dtype=float), 0.0, n - 1.0)
    lo = np.floor(x).astype(int)
    frac = x - lo
    hi = np.minimum(lo + 1, n - 1)
    out = np.bincount(lo, weights=1.0 - frac, minlength=n) + np.bincount(hi, weights=frac, minlength=n)
    return np.asarray(out / len(x))


class StepChain:
    """The laws of the decoder's steps on a time grid of cells h = d / CELLS_PER_STEP (module docstring),
    kept as Fourier transforms of length >= 3 x the grid (sums of up to three of them never wrap).

    s[k]: pmf of S_k, the sum of k prefill parts (k-fold convolution of the local prompts' sample);
    step[k]: pmf of a step prefilling k prompts, d + S_k; pois[m]: P(M = m | a step of each grid length);
    pi: the chain's stationary law of K (per step); g[m]: the joint law of the residual R of the step in
    progress at a random time and the class M of the next step (time-stationary: P(R in dr, M = m) =
    (1 / E[T]) sum_{t > r} P(step = t) P(M = m | t) dr)."""

    def __init__(self, parts_s: np.ndarray, rate_per_s: float, step_s: float) -> None:
        parts = np.asarray(parts_s, dtype=float)
        kmax = K_MAX
        t_max = 3.0 * (step_s + kmax * float(parts.max(initial=0.0)))
        # cells of d / CELLS_PER_STEP (the decode step's residual is the body of every law here), at most
        # GRID of them (then coarser)
        self.n = n = min(GRID, max(64, math.ceil(t_max / step_s * CELLS_PER_STEP)))
        self.h = h = t_max / n
        self.kmax = kmax
        self.size = size = 1 << (3 * n).bit_length()
        # a part between two cells is split between them in proportion (keeps the mean)
        one_hat = np.fft.rfft(_on_grid(parts / h if len(parts) else np.zeros(1), n), size)
        d_hat = np.fft.rfft(_on_grid(np.array([step_s / h]), n), size)
        self.s_hat = [one_hat**k for k in range(kmax + 1)]
        self.step_hat = [x * d_hat for x in self.s_hat]
        self.step = [self._back(x) for x in self.step_hat]
        t = np.arange(n) * h
        self.pois = _poisson_to(kmax, rate_per_s * t)  # (kmax + 1, n)
        trans = np.array([self.pois @ x for x in self.step])  # trans[j, k] = P(K' = k | K = j)
        a = np.vstack([trans.T - np.eye(kmax + 1), np.ones(kmax + 1)])
        b = np.zeros(kmax + 2)
        b[-1] = 1.0
        pi = np.clip(np.linalg.lstsq(a, b, rcond=None)[0], 0.0, None)
        self.pi = pi / pi.sum()
        f_step = self.pi @ np.array(self.step)
        mean_t = float(f_step @ t)
        self.mean_step_s = mean_t  # E[T] per step (step average)
        # g[m][i]: P(R in [i h, (i + 1) h), M = m); a step of j cells leaves each of its j cells with
        # probability 1 / j, and is hit with probability ~ j h P(step) / E[T]
        z = f_step[None, :] * self.pois * h / mean_t  # (kmax + 1, n)
        g = np.cumsum(z[:, ::-1], axis=1)[:, ::-1]
        g = np.concatenate([g[:, 1:], np.zeros((kmax + 1, 1))], axis=1)  # strictly longer steps
        self.g = g / g.sum()
        self.classes = [m for m in range(kmax + 1) if self.g[m].sum() > NEGLIGIBLE]
        self.values = (np.arange(3 * n) + 0.5) * h  # a sum of three laws spans 3 n cells

    def _back(self, x_hat: np.ndarray, cells: int | None = None) -> np.ndarray:
        return np.clip(np.fft.irfft(x_hat, self.size)[: cells or self.n], 0.0, None)

    def local_wait(self) -> np.ndarray:
        """pmf of Y = R + S_M on the grid (values ~ (i + 1/2) h)."""
        y_hat = sum(np.fft.rfft(self.g[m], self.size) * self.s_hat[m] for m in self.classes)
        return self._back(np.asarray(y_hat), len(self.values))

    def handoff(self) -> np.ndarray:
        """pmf of H = R1 + T_b + T_c on the grid: T_b = d + S_M (M the class that follows the step in
        progress), T_c = d + S_M', M' ~ Poisson(lam T_b)."""
        out = np.zeros(self.size // 2 + 1, dtype=complex)
        for m in self.classes:
            # T_b + T_c given T_b's class m (T_c's class depends on T_b's length)
            q_hat = np.zeros_like(out)
            for j in range(self.kmax + 1):
                a = self.step[m] * self.pois[j]
                if a.sum() > NEGLIGIBLE:
                    q_hat += np.fft.rfft(a, self.size) * self.step_hat[j]
            out += np.fft.rfft(self.g[m], self.size) * q_hat
        return self._back(out, len(self.values))

    def local_survival(self) -> Survival:
        """b -> P(Y > b): a local prompt's violation when its budget beyond d + p_i is b."""
        return _survival(self.values, self.local_wait(), 0.0, math.inf, self.h)

    def handoff_survival(self, p_wait: float, theta_s: float) -> Survival:
        """b -> P(W + H > b), W the prefill pool's wait (P(W > w) = p_wait exp(-w / theta) for w >= 0,
        placement.ilp.queueing.wait_tail) independent of the decoder's H (different instances)."""
        return _survival(self.values, self.handoff(), p_wait, theta_s, self.h)

    def handoff_survival_sample(self, delay_s: np.ndarray) -> Survival:
        """b -> P(V + H > b), V a sample of the prefill pool's delay beyond the prompt's own prefill
        (placement.ilp.prefillpool: its chunked steps), independent of the decoder's H; on the grid (V's
        sample binned to its cells, shifted by its least value when that is negative)."""
        v = np.asarray(delay_s, dtype=float)
        v0 = min(float(v.min(initial=0.0)), 0.0)
        cells = int(math.ceil((float(v.max(initial=0.0)) - v0) / self.h)) + 2
        pmf_v = _on_grid((v - v0) / self.h, cells)
        h_pmf = self.handoff()
        size = 1 << (len(h_pmf) + cells).bit_length()
        both = np.fft.irfft(np.fft.rfft(pmf_v, size) * np.fft.rfft(h_pmf, size), size)[: len(h_pmf) + cells]
        both = np.clip(both, 0.0, None)
        values = (np.arange(len(both)) + 0.5) * self.h + v0
        return _survival(values, both / both.sum(), 0.0, math.inf, self.h)


def _survival(values: np.ndarray, pmf: np.ndarray, p_wait: float, theta_s: float, h: float) -> Survival:
    """b -> P(W + X > b) for X on the grid (pmf at `values`) and an independent W >= 0 with
    P(W > w) = p_wait exp(-w / theta) (none when p_wait = 0): P(X > b) + p_wait sum_{x <= b} P(X = x)
    exp(-(b - x) / theta), tabulated at the grid's values and interpolated; beyond the grid the exponential
    tail alone."""
    if p_wait > 0 and not math.isfinite(theta_s):  # an unstable queue: every budget is missed
        return lambda b: np.ones_like(np.asarray(b, dtype=float))
    v = values[: len(pmf)]
    tail = np.concatenate([np.cumsum(pmf[::-1])[::-1][1:], [0.0]])  # P(X > v_j)
    table = tail
    r = 0.0
    last = 0.0
    if p_wait > 0 and theta_s > 0:
        r = math.exp(-h / theta_s)
        size = 1 << (2 * len(pmf)).bit_length()
        kernel = r ** np.arange(len(pmf), dtype=float)
        e = np.fft.irfft(np.fft.rfft(pmf, size) * np.fft.rfft(kernel, size), size)[: len(pmf)]
        e = np.clip(e, 0.0, None)
        table = np.minimum(tail + p_wait * e, 1.0)
        last = float(p_wait * e[-1])
    v_end = float(v[-1])

    def surv(b: np.ndarray) -> np.ndarray:
        b = np.asarray(b, dtype=float)
        out = np.interp(b, v, table, left=1.0, right=0.0)
        if last > 0:
            far = b > v_end
            out = np.where(far, last * np.exp(-np.maximum(b - v_end, 0.0) / theta_s), out)
        return np.asarray(np.where(b < 0, 1.0, out))

    return surv
