"""A conversation brought in line with what router replicas sharing a store decided for it.

A replica alone numbers a conversation's turns and pins it from its memory (ConversationState, PinBook).
Replicas sharing a PostgreSQL ledger must not: a conversation's turns may alternate between them, so the
store decides (energy/heads.py; the driver's side of it: orchestrator/replicas.py). When a turn starts the
store answers with a :class:`TurnClaim`, and :func:`adopt_claim` makes the conversation state agree with it:
the turn count (``next_turn()`` then numbers the turn as the store did), the context and decoder of turns
another replica served, and the pin in the PinBook.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Protocol

from orchestrator.core.conversations import ConversationState
from orchestrator.core.pins import PinBook

__all__ = ["TurnClaim", "adopt_claim"]


class TurnClaim(Protocol):
    """What the shared store answers when a turn starts (energy.heads.HeadClaim)."""

    @property
    def turn(self) -> int: ...  # the number the store gave this turn
    @property
    def pin(self) -> str | None: ...  # the decoder the conversation is pinned to, None: not pinned
    @property
    def context_tokens(self) -> int: ...  # prompt + output of the last finished turn
    @property
    def last_decoder(self) -> str | None: ...  # decoder of the last finished turn (holds its KV)


def adopt_claim(
    conv: ConversationState, claim: TurnClaim, book: PinBook, known: Container[str], first_arrival_s: float
) -> None:
    """Bring `conv` in line with the store before its next turn: ``conv.next_turn()`` numbers it
    ``claim.turn``; turns another replica served since this one's last carry their context and decoder; the
    pin is the store's (one on a decoder this driver does not know leaves the conversation unpinned here);
    the first arrival is the earliest any replica saw (`first_arrival_s`, on this driver's clock)."""
    if claim.turn - 1 != conv.turns:
        conv.context_tokens = claim.context_tokens
        conv.last_decoder = claim.last_decoder
    conv.turns = claim.turn - 1
    if claim.pin != conv.pin:
        if claim.pin is not None and claim.pin in known:
            book.pin(conv, claim.pin)
        else:
            book.unpin(conv)
    conv.first_arrival_s = min(conv.first_arrival_s, first_arrival_s)
