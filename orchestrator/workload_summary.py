"""What the planner needs to know about a workload: its statistics and a sample of its conversations' shapes.

Pure. Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from orchestrator.errors import WorkloadError
from orchestrator.workload_spec import ConversationSpec


@dataclass(frozen=True, slots=True)
class WorkloadStats:
    """What the planner needs to know about a workload (all means are per conversation unless named per turn).

    KV-token-seconds of a conversation on its decoder, for a decode step time t (seconds per output token):
        KVTS(t) = kv_decode_token_steps_mean * t + kv_gap_token_seconds_mean
    where kv_decode_token_steps_mean = E[sum_k out_k * (input_k + out_k / 2)] (context held while decoding
    turn k, growing by one token per step) and
    kv_gap_token_seconds_mean = E[sum_{k>=2} gap_k * (input_{k-1} + out_{k-1})].
    Residence on the decoder: R(t) = decode_tokens_mean * t + tool_gap_s_total_mean (+ tail prefill time).
    """

    conversations: int
    arrival_rate_per_s: float
    turns_total: int
    turns_per_conversation_mean: float
    turn1_input_tokens_mean: float
    turn1_input_tokens_p50: float
    turn1_input_tokens_p95: float
    turn1_input_tokens_quantiles: tuple[int, ...]  # 100 evenly spaced quantiles (for E[S], E[S^2] of prefill)
    appended_tokens_per_later_turn_mean: float
    output_tokens_per_turn_mean: float
    output_tokens_per_later_turn_mean: float
    tool_gap_s_mean: float  # per later turn
    tool_gap_s_total_mean: float  # per conversation
    decode_tokens_mean: float  # sum of output tokens per conversation
    decode_tokens_before_final_mean: (
        float  # outputs of turns 1..n-1 (decoded before the final turn's 1st token)
    )
    tail_prefill_tokens_mean: float  # sum over turns 2..n of (appended_k + out_{k-1}): incremental prefill
    tail_prefill_context_tokens_mean: float  # mean cached context those incremental prefills attend over
    later_turns_mean: float
    kv_decode_token_steps_mean: float
    kv_gap_token_seconds_mean: float
    final_context_tokens_mean: float
    final_context_tokens_p95: float
    final_context_tokens_max: int
    tokens_per_conversation_mean: float  # prompt + output of every turn (the paper's tokens/J numerator)
    turn1_input_tokens_max: int = 0
    # per-conversation shapes for the planner's per-conversation SLO model (placement.ilp.ConvShape fields:
    # turn-1 tokens, decode tokens before the final turn, later turns, total tool gap s, tail-prefill tokens,
    # their mean cached context, token-weighted decode context); all conversations up to SHAPE_SAMPLE, else
    # an evenly spaced sample of them
    conversation_shapes: tuple[tuple[float, ...], ...] = ()

    def kv_token_seconds(self, step_time_s: float) -> float:
        """Mean KV-token-seconds a conversation holds on its decoder when a decode step takes step_time_s."""
        return self.kv_decode_token_steps_mean * step_time_s + self.kv_gap_token_seconds_mean

    def residence_s(self, step_time_s: float, tail_prefill_s: float = 0.0) -> float:
        """Mean time a conversation stays pinned to its decoder (Little's law: pinned = rate x residence)."""
        return self.decode_tokens_mean * step_time_s + self.tool_gap_s_total_mean + tail_prefill_s

    @property
    def tokens_per_s(self) -> float:
        return self.arrival_rate_per_s * self.tokens_per_conversation_mean


SHAPE_SAMPLE = 400  # conversations kept for the planner's per-conversation model (bounds its cost)


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    return float(np.quantile(np.asarray(sorted_vals, dtype=float), q)) if sorted_vals else 0.0


def workload_stats(convs: Sequence[ConversationSpec], rate_per_s: float | None = None) -> WorkloadStats:
    """Summarise conversations. rate_per_s None: estimate from arrivals, (n - 1) / (last - first arrival)."""
    if not convs:
        raise WorkloadError(
            "workload has no conversations. To fix: use a trace or set workload.conversations > 0."
        )
    if any(not c.turns for c in convs):
        bad = next(c.conversation_id for c in convs if not c.turns)
        raise WorkloadError(f"conversation {bad!r} has no turns. To fix: drop it from the trace.")
    if rate_per_s is None:
        arrivals = sorted(c.arrival_s for c in convs)
        span = arrivals[-1] - arrivals[0]
        if len(convs) < 2 or span <= 0:
            raise WorkloadError(
                "cannot estimate the arrival rate: all conversations arrive at once. To fix: set "
                "workload.arrival_rate_per_s."
            )
        rate_per_s = (len(convs) - 1) / span
    n = len(convs)
    turn1 = np.array([c.turns[0].appended_tokens for c in convs], dtype=float)
    later_app: list[int] = []
    outs_all: list[int] = []
    outs_later: list[int] = []
    gaps: list[float] = []
    gap_tot = dec_tot = dec_before = tail_tok = tail_ctx_w = kv_steps = kv_gap = tokens = 0.0
    finals: list[int] = []
    turns_total = 0
    shapes: list[tuple[float, ...]] = []
    for c in convs:
        ctx_in = 0  # input tokens of the current turn
        prev_in = prev_out = 0
        c_before, c_gap, c_tail, c_tail_w, c_steps, c_dec = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        for k, t in enumerate(c.turns, start=1):
            ctx_in = t.appended_tokens if k == 1 else prev_in + prev_out + t.appended_tokens
            outs_all.append(t.output_tokens)
            if k > 1:
                later_app.append(t.appended_tokens)
                outs_later.append(t.output_tokens)
                gaps.append(t.tool_gap_s)
                gap_tot += t.tool_gap_s
                kv_gap += t.tool_gap_s * (prev_in + prev_out)
                new = t.appended_tokens + prev_out
                tail_tok += new
                tail_ctx_w += new * prev_in
                c_gap += t.tool_gap_s
                c_tail += new
                c_tail_w += new * prev_in
            kv_steps += t.output_tokens * (ctx_in + t.output_tokens / 2.0)
            c_steps += t.output_tokens * (ctx_in + t.output_tokens / 2.0)
            c_dec += t.output_tokens
            dec_tot += t.output_tokens
            if k < len(c.turns):
                dec_before += t.output_tokens
                c_before += t.output_tokens
            tokens += ctx_in + t.output_tokens
            prev_in, prev_out = ctx_in, t.output_tokens
        turns_total += len(c.turns)
        finals.append(prev_in + prev_out)
        shapes.append(
            (
                float(c.turns[0].appended_tokens),
                c_before,
                float(len(c.turns) - 1),
                c_gap,
                c_tail,
                c_tail_w / c_tail if c_tail else 0.0,
                c_steps / c_dec if c_dec else 0.0,
            )
        )
    fin = np.array(finals, dtype=float)
    qs = np.quantile(turn1, np.linspace(0.005, 0.995, 100))
    return WorkloadStats(
        conversations=n,
        arrival_rate_per_s=float(rate_per_s),
        turns_total=turns_total,
        turns_per_conversation_mean=turns_total / n,
        turn1_input_tokens_mean=float(turn1.mean()),
        turn1_input_tokens_p50=float(np.quantile(turn1, 0.5)),
        turn1_input_tokens_p95=float(np.quantile(turn1, 0.95)),
        turn1_input_tokens_quantiles=tuple(int(round(q)) for q in qs),
        appended_tokens_per_later_turn_mean=float(np.mean(later_app)) if later_app else 0.0,
        output_tokens_per_turn_mean=float(np.mean(outs_all)),
        output_tokens_per_later_turn_mean=float(np.mean(outs_later)) if outs_later else 0.0,
        tool_gap_s_mean=float(np.mean(gaps)) if gaps else 0.0,
        tool_gap_s_total_mean=gap_tot / n,
        decode_tokens_mean=dec_tot / n,
        decode_tokens_before_final_mean=dec_before / n,
        tail_prefill_tokens_mean=tail_tok / n,
        tail_prefill_context_tokens_mean=tail_ctx_w / tail_tok if tail_tok else 0.0,
        later_turns_mean=turns_total / n - 1.0,
        kv_decode_token_steps_mean=kv_steps / n,
        kv_gap_token_seconds_mean=kv_gap / n,
        final_context_tokens_mean=float(fin.mean()),
        final_context_tokens_p95=float(np.quantile(fin, 0.95)),
        final_context_tokens_max=int(fin.max()),
        tokens_per_conversation_mean=tokens / n,
        turn1_input_tokens_max=int(turn1.max()),
        conversation_shapes=tuple(
            shapes
            if n <= SHAPE_SAMPLE
            else [shapes[int(i)] for i in np.linspace(0, n - 1, SHAPE_SAMPLE).round().astype(int)]
        ),
    )
