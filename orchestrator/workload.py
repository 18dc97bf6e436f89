"""Agentic workloads: conversations of turns, from traces or a synthetic generator.

THIS IS THE CONTRACT the planner and the simulator code against (the dataclasses and function names below).
A conversation's turn k input is the previous turn's input + the previous turn's output + the tokens appended
this turn (the paper's trace satisfies total_input[k] = total_input[k-1] + out[k-1] + appended[k]).

The dataclasses are in orchestrator/workload_spec.py, the trace loaders in orchestrator/traces.py and the
planner's statistics in orchestrator/workload_summary.py; this module generates synthetic conversations and
arrivals, builds a fleet file's workload, and re-exports every name. Must not import fastapi, sqlalchemy or
httpx.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from orchestrator.config import SyntheticWorkload, WorkloadConfig
from orchestrator.errors import WorkloadError
from orchestrator.traces import load_conserve_trace, load_mooncake
from orchestrator.workload_spec import ConversationSpec, TurnSpec
from orchestrator.workload_summary import SHAPE_SAMPLE, WorkloadStats, workload_stats

__all__ = [
    "SHAPE_SAMPLE",
    "ConversationSpec",
    "TurnSpec",
    "WorkloadStats",
    "load_conserve_trace",
    "load_mooncake",
    "poisson_arrivals",
    "synthetic_conversations",
    "workload_from_config",
    "workload_stats",
]


def synthetic_conversations(params: SyntheticWorkload, n: int, seed: int = 0) -> list[ConversationSpec]:
    """Generate `n` agentic conversations; deterministic for `seed`. Arrivals are 0 (see poisson_arrivals).

    Distributions (parameters are the fields of ``SyntheticWorkload``):
    - turn-1 input tokens: log-normal with median ``turn1_input_tokens_median`` and log-sigma
      ``turn1_input_tokens_sigma`` (sigma 0 gives the median exactly), at least 1;
    - turns per conversation: 1 + Geometric, i.e. P(T = t) = p (1-p)^(t-1) with p = 1 / ``turns_mean``,
      so the mean is ``turns_mean`` (turns_mean 1 gives single-turn conversations);
    - appended tokens of turns 2..n: Poisson with mean ``appended_tokens_mean``;
    - output tokens of every turn: 1 + Geometric with mean ``output_tokens_mean`` (an exponential-like tail,
      as decode lengths of tool-calling agents are);
    - tool gap before turns 2..n: exponential with mean ``tool_gap_s_mean`` (0 gives no gaps).
    """
    if n < 0:
        raise WorkloadError(f"number of conversations must be >= 0, got {n}. To fix: pass a count >= 0.")
    rng = np.random.default_rng(seed)
    mu = math.log(params.turn1_input_tokens_median)
    first = np.maximum(1, np.rint(rng.lognormal(mu, params.turn1_input_tokens_sigma, n))).astype(int)
    n_turns = rng.geometric(1.0 / params.turns_mean, n) if params.turns_mean > 1 else np.ones(n, dtype=int)
    out_p = 1.0 / params.output_tokens_mean
    convs: list[ConversationSpec] = []
    for i in range(n):
        t = int(n_turns[i])
        outs = rng.geometric(out_p, t) if out_p < 1 else np.ones(t, dtype=int)
        appended = rng.poisson(params.appended_tokens_mean, t - 1)
        gaps = (
            rng.exponential(params.tool_gap_s_mean, t - 1) if params.tool_gap_s_mean > 0 else np.zeros(t - 1)
        )
        turns = [TurnSpec(int(first[i]), int(outs[0]))]
        turns += [TurnSpec(int(appended[k]), int(outs[k + 1]), float(gaps[k])) for k in range(t - 1)]
        convs.append(ConversationSpec(conversation_id=f"syn-{i}", arrival_s=0.0, turns=tuple(turns)))
    return convs


def poisson_arrivals(
    convs: Sequence[ConversationSpec], rate_per_s: float, seed: int = 0
) -> list[ConversationSpec]:
    """Give conversations Poisson arrivals (exponential inter-arrival times, mean 1/rate), in list order.

    The first conversation arrives at time 0. Deterministic for `seed`; the input is not modified.
    """
    if not rate_per_s > 0 or not math.isfinite(rate_per_s):
        raise WorkloadError(
            f"arrival rate must be > 0 conversations/s, got {rate_per_s}. To fix: pass a rate > 0."
        )
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_per_s, len(convs))
    times = np.concatenate(([0.0], np.cumsum(gaps[1:]))) if len(convs) else np.array([])
    return [replace(c, arrival_s=float(t)) for c, t in zip(convs, times, strict=True)]


_DEFAULT_SYNTHETIC_CONVERSATIONS = 1000


def trace_timed(wcfg: WorkloadConfig) -> bool:
    """True when the workload's arrivals are a trace's own timestamps (see workload_from_config)."""
    return wcfg.format == "mooncake" and "arrival_rate_per_s" not in wcfg.model_fields_set


def workload_from_config(wcfg: WorkloadConfig) -> list[ConversationSpec]:
    """Build the conversations a fleet file describes (see docs/fleet-yaml.md, section workload).

    conserve and synthetic: Poisson arrivals at ``arrival_rate_per_s`` (seeded by ``seed``).
    mooncake: the trace's own timestamps, unless ``arrival_rate_per_s`` is set explicitly in the file, in
    which case Poisson arrivals at that rate replace them. ``tool_gap_s`` overrides every later turn's gap.
    """
    if wcfg.format in ("conserve", "mooncake"):
        if wcfg.path is None:  # also enforced by the schema
            raise WorkloadError(
                f"workload.path: format {wcfg.format!r} needs a trace path. To fix: set workload.path."
            )
        if not Path(wcfg.path).is_file():
            raise WorkloadError(
                f"workload.path: trace file {str(wcfg.path)!r} does not exist. To fix: correct the path "
                "(relative paths resolve against the fleet file's directory) or use format: synthetic."
            )
    if wcfg.format == "conserve":
        assert wcfg.path is not None
        convs = load_conserve_trace(wcfg.path, wcfg.conversations, wcfg.max_turns)
        convs = poisson_arrivals(convs, wcfg.arrival_rate_per_s, wcfg.seed)
    elif wcfg.format == "mooncake":
        assert wcfg.path is not None
        convs = load_mooncake(wcfg.path, wcfg.conversations, wcfg.max_turns)
        if not trace_timed(wcfg):
            convs = poisson_arrivals(convs, wcfg.arrival_rate_per_s, wcfg.seed)
    else:
        n = wcfg.conversations or _DEFAULT_SYNTHETIC_CONVERSATIONS
        convs = synthetic_conversations(wcfg.synthetic, n, wcfg.seed)
        if wcfg.max_turns:
            convs = [replace(c, turns=c.turns[: wcfg.max_turns]) for c in convs]
        convs = poisson_arrivals(convs, wcfg.arrival_rate_per_s, wcfg.seed)
    if wcfg.tool_gap_s is not None:
        gap = wcfg.tool_gap_s
        convs = [
            replace(c, turns=(c.turns[0], *(replace(t, tool_gap_s=gap) for t in c.turns[1:]))) for c in convs
        ]
    return convs
