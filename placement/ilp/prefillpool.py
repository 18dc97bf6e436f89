"""A prefill pool's delay beyond a prompt's own prefill, with chunked steps (docs/planning.md, "How close the
model is"; the hybrid plan's remote path, placement.ilp.predict).

The M/G/k wait (placement.ilp.queueing.wait_tail) is a central FCFS queue whose server gives each prompt its
standalone prefill time. A prefiller does not run that way: it steps, and each step computes chunks of the
prompts it holds, first come first served within a token budget (tiers.steps.plan_chunks; vLLM's chunked
prefill, which the simulator steps the same way). A prompt whose last chunk leaves room in the budget
shares that step with the next queued prompt's first chunk, so its prefill ends that chunk's time later
than FCFS has it; and the policy routes a prompt to the prefiller with the fewest queued tokens
(placement.selection._least_loaded_prefiller: tokens not yet computed, the step in progress's chunks
counted until the step ends), not the least work. On fleet-single-turn an exact FCFS two-server recursion on
the simulator's own arrivals and prompts gives the prefiller side (arrival -> prefill end, minus the own
prefill) mean 0.108 s, the simulator 0.127 s; this pool's steps on the same arrivals reproduce every
prompt's prefill end within 5 ms (seeds 0-1, 1,600 prompts).

Model: the pool's steps exactly as above on a reduced event model of its arrivals, from the plan's
quantities only: Poisson arrivals at the pool's planned rate, each prompt drawn from the conversations the
pool serves (the hybrid split's remote ones), k prefillers of the pool's tier model
(tiers.perf.TierModel.step_time_s per chunk, the first chunk's step plus each further chunk's step less a
decode step of one sequence, as tiers.steps.prefill_step_time_s with no decode batch), the token budget
PREFILL_BUDGET_TOKENS. What it returns: the sample of the delay V = prefill end - arrival - the prompt's own
prefill time (TierModel.prefill_time_s), over the steady arrivals. The TTFET mixture takes V's law for every
prompt of the pool alike (a long prompt, several chunks, meets the sharing more often: not resolved by
length); V and the decoder's hand-off H independent (different instances). Seeded: deterministic plans.
"""

from __future__ import annotations

import numpy as np

from placement.ilp.memo import memoised
from tiers.perf import TierModel
from tiers.steps import plan_chunks

# vLLM's default max_num_batched_tokens with chunked prefill, which the simulator also runs with
# (orchestrator.sim.options DEFAULT_MAX_BATCHED_TOKENS = 8192)
PREFILL_BUDGET_TOKENS = 8192
POOL_ARRIVALS = 20_000  # prompts of the reduced model (the first WARMUP share discarded)
WARMUP = 0.2
SEED = 0


def pool_ends(
    arrivals_s: np.ndarray, tokens: np.ndarray, servers: int, model: TierModel, budget: int
) -> np.ndarray:
    """Prefill end of each prompt (arrivals sorted) on `servers` chunked-prefill instances (module
    docstring): routed at arrival to the fewest queued tokens (ties: fewer prompts, then index); an idle
    instance starts a step at once, a busy one admits the prompt at its step's end."""
    n = len(arrivals_s)
    end = np.full(n, np.nan)
    k = max(1, int(servers))
    held: list[list[list[int]]] = [[] for _ in range(k)]  # per instance: [index, tokens left, computed]
    pending: list[list[list[int]]] = [[] for _ in range(k)]
    step_end = [0.0] * k
    in_step = [0] * k  # tokens of the step in progress (still queued until it ends)
    base = model.decode_step_time_s(1, 0)

    def advance(s: int, t: float) -> None:
        """Run instance s's steps that start at or before t."""
        while step_end[s] <= t:
            held[s].extend(pending[s])
            pending[s].clear()
            if not held[s]:
                in_step[s] = 0
                return
            sizes = plan_chunks(budget, 0, [j[1] for j in held[s]])
            dt = 0.0
            for i, c in enumerate(sizes):
                st = model.step_time_s(c, held[s][i][2], 0, 0)
                dt += st if i == 0 else st - base
            for i, c in enumerate(sizes):
                held[s][i][1] -= c
                held[s][i][2] += c
            step_end[s] += dt
            in_step[s] = sum(sizes)
            for j in held[s]:
                if j[1] <= 0:
                    end[j[0]] = step_end[s]
            held[s] = [j for j in held[s] if j[1] > 0]

    for i in range(n):
        t = float(arrivals_s[i])
        for s in range(k):
            advance(s, t)

        keys = []
        for s in range(k):
            queued = sum(j[1] for j in held[s]) + sum(j[1] for j in pending[s])
            queued += in_step[s] if step_end[s] > t else 0
            keys.append((queued, len(held[s]) + len(pending[s]), s))
        s = min(keys)[2]
        pending[s].append([i, int(tokens[i]), 0])
        if step_end[s] <= t:  # idle: its first step starts now
            step_end[s] = t
            advance(s, t)
    for s in range(k):
        advance(s, float("inf"))
    return end


@memoised
def pool_delay_sample(
    tokens: np.ndarray,
    rate_per_s: float,
    servers: int,
    model: TierModel,
    budget: int = PREFILL_BUDGET_TOKENS,
    arrivals: int = POOL_ARRIVALS,
    seed: int = SEED,
) -> np.ndarray:
    """V = prefill end - arrival - own prefill time of the steady prompts of the reduced model (module
    docstring); tokens: the prompts the pool serves."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / rate_per_s, arrivals))
    lengths = np.maximum(1, np.round(rng.choice(np.asarray(tokens, dtype=float), arrivals))).astype(int)
    ends = pool_ends(times, lengths, servers, model, budget)
    own = {int(x): model.prefill_time_s(int(x)) for x in np.unique(lengths)}
    v = ends - times - np.array([own[int(x)] for x in lengths])
    return np.asarray(v[int(WARMUP * arrivals) :])
