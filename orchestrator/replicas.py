"""The router's side of replicas that agree: turn numbers and pins asked of a store the replicas share.

With several `serve` replicas on one PostgreSQL ledger (orchestrator/runtime.py ``shared_state``), the
router asks a :class:`SharedTurns` store (energy/heads.py PgConversationHeads):

1. :func:`claim_turn` when a turn starts: the turn's number and the pin in force; the conversation state is
   brought in line with them (orchestrator.core.shared.adopt_claim);
2. :func:`agree_pin` when the policy binds the conversation to a decoder (turn 1, a re-placement): a
   compare-and-set in the store; a replica that lost the race takes the winner's pin;
3. :func:`finish_turn` when a turn ended well, while its record is committed: its context for the next
   turn, wherever it arrives, and the pin released when the client ended the conversation.

When the store fails (an outage, a timeout) the router goes on from its memory, as a single replica does,
and says so in the log: serving never stops for it. Without a store (one replica, SQLite) none of this runs
and nothing is added to a turn.

Must not import fastapi or sqlalchemy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Container
from datetime import datetime
from typing import Protocol, TypeVar

from conserve.clock import Clock
from conserve.errors import ConServeError
from orchestrator.core import ConversationState, PinBook, moves_pin
from orchestrator.core.shared import TurnClaim, adopt_claim
from placement.base import Placement

log = logging.getLogger(__name__)

__all__ = [
    "SharedTurns",
    "SharedClaim",
    "agree_pin",
    "agreed_placement",
    "claim_turn",
    "finish_turn",
    "settle",
]

T = TypeVar("T")
# Placements tried when other replicas keep winning the pin race (each loss adopts the winner's pin, so the
# policy keeps it the next time unless that decoder is down here)
PIN_RACE_TRIES = 3


class SharedClaim(TurnClaim, Protocol):
    @property
    def first_arrival_at(self) -> datetime: ...


class SharedTurns(Protocol):
    """The store replicas share. Its errors are ConServeErrors (the router then decides from memory)."""

    async def claim(self, conversation_id: str, at: datetime) -> SharedClaim: ...

    async def move_pin(self, conversation_id: str, expected: str | None, new: str) -> str | None: ...

    async def finish(
        self,
        conversation_id: str,
        turn: int,
        *,
        context_tokens: int,
        decoder: str | None,
        ended: bool,
        at: datetime,
    ) -> None: ...

    async def aclose(self) -> None: ...


async def claim_turn(
    store: SharedTurns,
    conv: ConversationState,
    book: PinBook,
    known: Container[str],
    clock: Clock,
    arrival_s: float,
) -> bool:
    """Claim `conv`'s next turn in the store and adopt it; False (memory decides) when the store failed."""
    try:
        claim = await store.claim(conv.conversation_id, clock.wall(arrival_s))
    except ConServeError as err:
        log.warning("conversation %s: %s; numbering from this replica's memory", conv.conversation_id, err)
        return False
    adopt_claim(conv, claim, book, known, clock.at_s(claim.first_arrival_at))
    return True


async def agree_pin(store: SharedTurns, conversation_id: str, expected: str | None, new: str) -> str | None:
    """Pin `conversation_id` to `new` in the store if its pin there is still `expected`; returns the pin in
    force (another replica's when it won the race; `new` when the store failed or holds no head for the
    conversation: memory decides)."""
    try:
        agreed = await store.move_pin(conversation_id, expected, new)
    except ConServeError as err:
        log.warning("conversation %s: %s; pinning from this replica's memory", conversation_id, err)
        return new
    if agreed is None:  # the store has no head for it (its claim fell back to memory): memory decides
        return new
    return agreed


async def finish_turn(store: SharedTurns, conv: ConversationState, turn: int, at: datetime) -> None:
    """Tell the store that `turn` of `conv` ended well (after ``conv.turn_ended``; ``conv.ended`` when the
    client ended the conversation)."""
    try:
        await store.finish(
            conv.conversation_id,
            turn,
            context_tokens=conv.context_tokens,
            decoder=conv.last_decoder,
            ended=conv.ended,
            at=at,
        )
    except ConServeError as err:
        log.warning("conversation %s: %s (its next turn reads it again)", conv.conversation_id, err)


async def agreed_placement(
    store: SharedTurns | None,
    conv: ConversationState,
    book: PinBook,
    known: Container[str],
    decide: Callable[[T], Placement],
    turn: T,
) -> Placement | None:
    """``decide(turn)`` (the policy's placement), with a pin move agreed in the store first: when another
    replica pinned the conversation meanwhile, its pin is adopted (recorded by that replica) and the turn
    placed again. None: other replicas kept winning (the router answers 503: send the turn again). Without a
    store, just ``decide(turn)``."""
    if store is None:
        return decide(turn)
    expected = conv.pin  # the store's pin as far as this replica knows (claim_turn)
    for _ in range(PIN_RACE_TRIES):
        placement = decide(turn)
        if not moves_pin(placement, conv.pin):
            return placement
        agreed = await agree_pin(store, conv.conversation_id, expected, placement.decode_instance)
        if agreed == placement.decode_instance:
            return placement
        expected = agreed
        if agreed is not None and agreed in known:
            book.pin(conv, agreed)
        else:
            book.unpin(conv)
    return None


async def settle(
    durability: Callable[[], Awaitable[None]] | None,
    store: SharedTurns | None,
    conv: ConversationState,
    turn: int,
    clock: Clock,
) -> None:
    """Before an answered turn's last byte: its record committed (`durability`) and, with replicas, the
    store told (:func:`finish_turn`), both at once."""
    if store is None:  # one replica: only the commit to wait for (no task wrapped around it by gather)
        if durability is not None:
            await durability()
        return
    waits: list[Awaitable[None]] = [] if durability is None else [durability()]
    waits.append(finish_turn(store, conv, turn, clock.wall()))
    await asyncio.gather(*waits)
