"""adopt_claim (orchestrator/core/shared.py): a conversation brought in line with the shared store's claim."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.core import ConversationState, PinBook
from orchestrator.core.shared import adopt_claim


@dataclass
class _Holder:
    pinned: set[str] = field(default_factory=set)
    pinned_tokens: int = 0


@dataclass(frozen=True)
class _Claim:
    turn: int
    pin: str | None
    context_tokens: int = 0
    last_decoder: str | None = None


def _book() -> tuple[PinBook, dict[str, _Holder]]:
    holders = {"d0": _Holder(), "d1": _Holder()}
    return PinBook(holders), holders


def test_the_next_turn_gets_the_stores_number_and_pin() -> None:
    book, holders = _book()
    conv = ConversationState("c", first_arrival_s=10.0)
    adopt_claim(conv, _Claim(3, "d1", 500, "d1"), book, holders, first_arrival_s=4.0)
    assert conv.next_turn(600).turn == 3
    assert conv.pin == "d1" and book.pins == {"c": "d1"} and holders["d1"].pinned == {"c"}
    # turns 1-2 were served elsewhere: their context is the store's, so turn 3's new tokens are 100
    assert conv.context_tokens == 500 and conv.last_decoder == "d1" and conv.first_arrival_s == 4.0


def test_a_replica_that_served_the_previous_turn_keeps_its_own_context() -> None:
    book, holders = _book()
    conv = ConversationState("c", turns=2, context_tokens=700, last_decoder="d0")
    book.pin(conv, "d0")
    adopt_claim(conv, _Claim(3, "d0", 0, None), book, holders, first_arrival_s=0.0)
    assert conv.turns == 2 and conv.context_tokens == 700 and conv.pin == "d0"


def test_a_pin_released_or_on_an_unknown_decoder_leaves_the_conversation_unpinned_here() -> None:
    for pin in (None, "elsewhere"):
        book, holders = _book()
        conv = ConversationState("c", turns=1)
        book.pin(conv, "d0")
        book.account(conv, 300)
        adopt_claim(conv, _Claim(2, pin), book, holders, first_arrival_s=0.0)
        assert conv.pin is None and book.pins == {} and holders["d0"].pinned_tokens == 0
