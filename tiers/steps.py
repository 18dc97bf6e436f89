"""The instance step model and the KV hand-off model, once, for every driver that advances engines in time.

The discrete-event simulator (orchestrator/sim/) and the simulated engines behind `serve --backend sim`
(orchestrator/engines/sim.py) advance an instance the same way, vLLM-like (V1 scheduler, chunked prefill):

- one step decodes one token for every running decode sequence, and the rest of the step's token budget
  (``max_batched_tokens`` less one token per decoding sequence) goes to prefill chunks, first come first
  served (:func:`plan_chunks`);
- a step with prefill chunks lasts :func:`prefill_step_time_s`: the first chunk as one continuous-batching
  step with the decode batch (``TierModel.step_time_s``), each further chunk adding its own GPU work
  (its ``step_time_s`` less the decode step it shares); it draws :func:`prefill_step_power_w`;
- a decode-only step lasts ``TierModel.decode_step_time_s(batch, context)`` and draws
  ``TierModel.step_power_w(0, batch, context)``;
- a hand-off of KV between two instances runs over the slower of their links (:func:`handoff_link`) and
  lasts ``tiers.links.kv_transfer_time_s``; a per-turn round trip also pays both sides' block bookkeeping
  (``tiers.connector.kv_bookkeeping_s``) over the whole prompt (:func:`handoff_time_s`).

Pure; must not import fastapi, sqlalchemy, httpx or orchestrator.
"""

from __future__ import annotations

from collections.abc import Sequence

from tiers.connector import kv_bookkeeping_s
from tiers.links import LinkType, kv_transfer_time_s
from tiers.perf import TierModel

__all__ = [
    "LINK_ORDER",
    "handoff_link",
    "handoff_time_s",
    "plan_chunks",
    "prefill_step_power_w",
    "prefill_step_time_s",
]

# A prefill chunk of a step: (tokens computed in the step, tokens of that prompt already in KV before it).
Chunk = tuple[int, int]

# Link types from slowest to fastest (tiers.links bandwidths: 12.5 GB/s, 50 GB/s, 116.4 GB/s, 450 GB/s).
LINK_ORDER: tuple[str, ...] = (LinkType.ETHERNET, LinkType.INFINIBAND, LinkType.PCIE, LinkType.NVLINK)


def plan_chunks(budget_tokens: int, decode_batch: int, prefill_left: Sequence[int]) -> list[int]:
    """Tokens each prefilling sequence (in order; ``prefill_left`` tokens still to compute) gets in the next
    step: the budget less one token per decoding sequence, first come first served. Stops at the first
    sequence that gets nothing; a list shorter than ``prefill_left`` means the rest wait."""
    budget = budget_tokens - decode_batch
    out: list[int] = []
    for left in prefill_left:
        if budget <= 0:
            break
        c = min(budget, left)
        out.append(c)
        budget -= c
    return out


def prefill_step_time_s(
    tm: TierModel, chunks: Sequence[Chunk], decode_batch: int, decode_context_tokens: int
) -> float:
    """Seconds of one step computing ``chunks`` (non-empty) alongside a decode batch of ``decode_batch``
    sequences holding ``decode_context_tokens`` tokens of context."""
    c0, cached0 = chunks[0]
    dt = tm.step_time_s(c0, cached0, decode_batch, decode_context_tokens)
    if len(chunks) > 1:
        base = tm.decode_step_time_s(max(decode_batch, 1), decode_context_tokens)
        for c, cached in chunks[1:]:
            dt += tm.step_time_s(c, cached, decode_batch, decode_context_tokens) - base
    return dt


def prefill_step_power_w(
    tm: TierModel, chunks: Sequence[Chunk], decode_batch: int, decode_context_tokens: int
) -> float:
    """Mean draw (W) of the instance over a :func:`prefill_step_time_s` step: every chunk's tokens at the
    first chunk's cached context. Decode power is mostly KV traffic: the batch's context counts, not just its
    size."""
    tokens = sum(c for c, _ in chunks)
    return tm.step_power_w(tokens, decode_batch, decode_context_tokens, chunks[0][1])


def handoff_link(a: LinkType | str, b: LinkType | str) -> str:
    """The link a KV hand-off between an instance on link ``a`` and one on link ``b`` runs over: the slower
    (an unknown name ranks slowest)."""
    if a == b:
        return str(a)
    ra = LINK_ORDER.index(a) if a in LINK_ORDER else 0
    rb = LINK_ORDER.index(b) if b in LINK_ORDER else 0
    return str(LINK_ORDER[min(ra, rb)])


def handoff_time_s(
    tokens: int,
    kv_bytes_per_token: int,
    link_a: LinkType | str,
    link_b: LinkType | str,
    round_trip_prompt_tokens: int = 0,
) -> float:
    """Seconds to hand ``tokens`` tokens of KV between instances on ``link_a`` and ``link_b``; a round trip's
    hand-back (``round_trip_prompt_tokens`` > 0: the turn's whole prompt) adds the block bookkeeping of both
    sides over that prompt."""
    t = kv_transfer_time_s(tokens, kv_bytes_per_token, handoff_link(link_a, link_b))
    if round_trip_prompt_tokens > 0:
        t += kv_bookkeeping_s(round_trip_prompt_tokens)
    return t
