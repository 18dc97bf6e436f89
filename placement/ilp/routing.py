"""The routing's memory: how often the local turn-1 prompts that arrive close together land on one hybrid
decoder under worst-fit placement (placement.selection._worst_fit_decoder), for the step chain
(placement.ilp.stepchain; docs/planning.md, "How close the model is").

The policy places every turn 1 on the decoder with the most free KV. What it sees as used KV is the larger of
what the engine holds (the admitted sequences' prompt + generated tokens: resident) and the prompts of the
turns pinned there (orchestrator.core.views.kv_used_tokens). Placing a prompt raises the pinned count at
once, the resident count only when the prompt is admitted (a local prompt at the end of the step in
progress; a remote one when its KV is handed off, after the prefill pool's wait and its prefill); while the
resident count leads the pinned one (the running sequences' generated tokens outweigh the prompts still in
flight) a placement does not lower the decoder's free KV at all. So the leader stays the leader for the
next arrivals unless its margin over the runner-up is smaller than what the placement took: the local
stream of one decoder comes in runs, not as a Poisson thinning of the arrivals. Measured on
fleet-single-turn (the policy's views logged, seed 0): the resident count led at 79% of the placements (by a
median 4,909 tokens), 28% of the placements had not lowered the chosen decoder's free KV by the next
arrival, the leader's margin had median 2,746 tokens against a median prompt of 3,017.

No closed form of the leader's margin under this balancing was found (the decoders' free KV is held within
about one prompt of each other: far narrower than independent draws from the batch law's occupancy); it is
taken from a reduced event model of exactly what the policy sees, built from the plan's own quantities and
nothing measured:
- turn-1 arrivals: Poisson at the planned rate, each a conversation drawn from the workload's sample
  (demand.conv_shapes: its turn-1 prompt), local when under the hybrid threshold (split.mask);
- the decoders: n of them (the main decode pool's instances), each stepping every d seconds (the planned
  decode step); a sequence admitted at time a holds prompt + min(generated, (t - a) / d) tokens and leaves
  after O tokens, O memoryless (geometric) with the workload's mean decode tokens per conversation O + Kn
  (the output law's shape is not among the plan's inputs);
- admission: a local prompt at the end of the step in progress (a uniform residual of d); a remote one
  after its own prefill time on the prefill tier plus the pool's delay beyond it (a draw from the sample of
  placement.ilp.prefillpool; where there is none, the M/G/k wait P(W > w) = P(W > 0) exp(-w / theta),
  placement.ilp.queueing.wait_tail);
- the policy: the decoder with the largest cap - max(resident, pinned) (equal capacities: the smallest
  max(resident, pinned)), ties by fewer pinned conversations, then by index (the instance id).
Left out: later turns (they stay on their decoder and hold KV between turns: single-turn workloads have few),
the prefill step's own length, KV capacity limits (the plan keeps occupancy far under them).

What the chain takes from it (near_local_rate): the rate of other local arrivals on a tagged local prompt's
decoder within +-w of its arrival, w the chain's mean step (the span whose arrivals share a step with it), in
place of the even split's rate lam. It is the Palm rate a tagged prompt sees; the time-stationary local rate
per decoder stays lam (the split is even on average), and the hand-off H keeps the even split.
Against the simulator (benchmarks/fidelity_local_stream.py, fleet-single-turn, seeds 0-2): P(same decoder)
of consecutive arrivals 0.66 / 0.59 / 0.48 / 0.39 at gaps 0-0.1 / 0.1-0.3 / 0.3-1 / 1-3 s, simulated
0.66 / 0.54 / 0.42 / 0.34; the neighbour rate 1.426/s, simulated 1.311/s (seeds 1.42 / 1.26 / 1.25), the
even split 0.663/s. The model's draws are seeded (deterministic plans). With 30,000 arrivals the rate
moved by 2-3% between seeds (fleet-single-turn: 1.417 / 1.444 / 1.483 per s at seeds 0-2);
ROUTING_ARRIVALS takes ~3x that for ~1.5% (~0.3 s a call).
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from placement.ilp.memo import memoised

ROUTING_ARRIVALS = 100_000  # turn-1 arrivals of the reduced model (the first WARMUP share discarded)
WARMUP = 0.2  # share of the arrivals before the decoders' occupancy is taken as steady
SEED = 0


@memoised
def routed_stream(
    turn1_tokens: np.ndarray,
    local: np.ndarray,
    remote_admit_s: np.ndarray,
    rate_per_s: float,
    decoders: int,
    step_s: float,
    decode_tokens: float,
    wait: tuple[float, float] | np.ndarray,
    arrivals: int = ROUTING_ARRIVALS,
    seed: int = SEED,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival times, decoder index, local flag) of the reduced model's turn-1 arrivals (module docstring).

    turn1_tokens, local: per conversation of the sample; remote_admit_s: per conversation, its prefill time
    on the prefill tier (ignored for local ones); wait: the pool's delay beyond the own prefill, a sample
    (placement.ilp.prefillpool) or (P(W > 0), theta) of the M/G/k wait."""
    rng = np.random.default_rng(seed)
    n = max(1, int(decoders))
    times = np.cumsum(rng.exponential(1.0 / rate_per_s, arrivals))
    conv = rng.integers(0, len(turn1_tokens), arrivals)
    p_geo = 1.0 / max(decode_tokens, 1.0)
    outs = rng.geometric(p_geo, arrivals).astype(float)
    resid = rng.uniform(0.0, step_s, arrivals)
    if isinstance(wait, np.ndarray):  # a sample of the pool's delay beyond the own prefill
        waits = rng.choice(wait, arrivals) if len(wait) else np.zeros(arrivals)
    else:
        p_wait, theta = wait
        waits = np.where(rng.uniform(size=arrivals) < p_wait, rng.exponential(theta, arrivals), 0.0)
    is_local = np.asarray(local, dtype=bool)[conv]
    # per decoder: placed (pinned) prompts' tokens and count; admitted sequences' count, prompt tokens and
    # admission times (an admitted sequence holds prompt + (t - a) / d tokens until it leaves, at a + O d)
    pinned = [0.0] * n
    placed = [0] * n
    adm_n = [0] * n
    adm_tokens = [0.0] * n
    adm_times = [0.0] * n
    events: list[tuple[float, int, int, float, float]] = []  # (time, kind 0 admit / 1 leave, decoder, L, a)
    chosen = np.empty(arrivals, dtype=int)
    for i in range(arrivals):
        t = float(times[i])
        while events and events[0][0] <= t:
            _, kind, j, ln, a = heapq.heappop(events)
            if kind == 0:
                adm_n[j] += 1
                adm_tokens[j] += ln
                adm_times[j] += a
            else:
                adm_n[j] -= 1
                adm_tokens[j] -= ln
                adm_times[j] -= a
                pinned[j] -= ln
                placed[j] -= 1
        best = (math.inf, math.inf, n)
        for j in range(n):
            resident = adm_tokens[j] + (adm_n[j] * t - adm_times[j]) / step_s
            key = (max(resident, pinned[j]), placed[j], j)
            if key < best:
                best = key
        j = best[2]
        c = conv[i]
        ln = float(turn1_tokens[c])
        a = t + (float(resid[i]) if is_local[i] else float(waits[i]) + float(remote_admit_s[c]))
        pinned[j] += ln
        placed[j] += 1
        heapq.heappush(events, (a, 0, j, ln, a))
        heapq.heappush(events, (a + float(outs[i]) * step_s, 1, j, ln, a))
        chosen[i] = j
    return times, chosen, is_local


def near_local_rate(times: np.ndarray, chosen: np.ndarray, is_local: np.ndarray, window_s: float) -> float:
    """Rate (per s) of other local arrivals on a tagged local arrival's decoder within +-window_s of it,
    over the steady arrivals (module docstring: what the chain takes)."""
    start = int(WARMUP * len(times))
    t, c, loc = times[start:], chosen[start:], is_local[start:]
    lt, lc = t[loc], c[loc]
    if len(lt) < 2 or window_s <= 0:
        return 0.0
    lo = np.searchsorted(lt, lt - window_s, side="left")
    hi = np.searchsorted(lt, lt + window_s, side="right")
    pairs = 0
    for i in range(len(lt)):
        pairs += int((lc[lo[i] : hi[i]] == lc[i]).sum()) - 1
    # tagged prompts near either end see only part of the window: count the window's measured span
    span = np.minimum(lt + window_s, lt[-1]) - np.maximum(lt - window_s, lt[0])
    return pairs / float(span.sum())
