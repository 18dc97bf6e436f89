"""Shared selection helpers of the placement policies (placement/policies.py, placement/per_turn.py): pure
functions of a FleetView. Must not import fastapi, sqlalchemy, httpx, or anything that reads wall-clock time.
"""

from __future__ import annotations

from collections.abc import Iterable

from placement.base import FleetView, InstanceView, Role, TurnRequest
from placement.errors import PlacementError

# ---- shared selection helpers (pure) ------------------------------------------------------------------


def _prefillers(view: FleetView) -> tuple[InstanceView, ...]:
    """Healthy dedicated prefillers taking work; else healthy colocated ones can prefill remotely."""
    pre = tuple(i for i in view.healthy(Role.PREFILL) if i.accepting)
    return pre if pre else tuple(i for i in view.healthy(Role.COLOCATED) if i.accepting)


def _decoders(view: FleetView) -> tuple[InstanceView, ...]:
    """Healthy decode-capable instances that take new conversations (a drained or parked one does not)."""
    return tuple(i for i in view.instances if i.healthy and i.accepting and i.role.can_decode)


def _least_loaded_prefiller(view: FleetView) -> InstanceView | None:
    """Least queued prefill work; ties by queue length, then id (deterministic)."""
    pre = _prefillers(view)
    if not pre:
        return None
    return min(pre, key=lambda i: (i.queued_prefill_tokens, i.waiting_seqs + i.running_seqs, i.instance_id))


def _worst_fit_decoder(
    decoders: Iterable[InstanceView], need_tokens: int, exclude: str | None = None
) -> tuple[InstanceView, bool]:
    """The decoder with the most free KV among those that can hold `need_tokens`; else the most free overall.

    Returns (decoder, fits). Ties by fewer pinned conversations, then id. When none fits, the decoder with the
    fewest waiting requests (then the most free KV). Raises when the list is empty.
    """
    cands = [d for d in decoders if d.instance_id != exclude]
    if not cands:
        raise PlacementError(
            "no healthy decode-capable instance to place the turn on. To fix: bring a decoder or colocated "
            "instance back, or add one to the fleet."
        )

    def key(d: InstanceView) -> tuple[int, int, str]:
        return (-d.kv_free_tokens, d.pinned_conversations, d.instance_id)

    fitting = [d for d in cands if d.kv_free_tokens >= need_tokens]
    if fitting:
        return min(fitting, key=key), True
    # Nothing fits: queue where the fewest requests already wait (observable), then the most free KV.
    return min(cands, key=lambda d: (d.waiting_seqs,) + key(d)), False


def _least_loaded_instance(cands: Iterable[InstanceView]) -> InstanceView:
    """vLLM production-stack style: fewest requests (running + waiting), then KV occupancy, then id."""
    lst = list(cands)
    if not lst:
        raise PlacementError(
            "no healthy decode-capable instance to place the turn on. To fix: bring an instance back."
        )
    return min(
        lst,
        key=lambda i: (
            i.running_seqs + i.waiting_seqs,
            i.queued_prefill_tokens,
            i.kv_occupancy,
            i.instance_id,
        ),
    )


def _need_tokens(turn: TurnRequest) -> int:
    return turn.input_tokens + (turn.max_output_tokens or 0)
