"""orchestrator/replicas.py: when the shared store fails (or holds no head for a conversation) the router
decides from its memory, as one replica does, and serving goes on."""

from __future__ import annotations

from datetime import datetime

from energy.errors import EnergyError
from orchestrator.core import ConversationState, PinBook
from orchestrator.replicas import agree_pin, claim_turn, finish_turn


class _Holder:
    def __init__(self) -> None:
        self.pinned: set[str] = set()
        self.pinned_tokens = 0


class Down:
    async def claim(self, conversation_id: str, at: datetime) -> object:
        raise EnergyError("PostgreSQL is down")

    async def move_pin(self, conversation_id: str, expected: str | None, new: str) -> str | None:
        raise EnergyError("PostgreSQL is down")

    async def finish(self, *a: object, **k: object) -> None:
        raise EnergyError("PostgreSQL is down")

    async def aclose(self) -> None:
        return None


class NoHead(Down):
    async def move_pin(self, conversation_id: str, expected: str | None, new: str) -> str | None:
        return None


async def test_a_failing_store_leaves_numbering_and_pins_to_memory() -> None:
    from conserve.clock import VirtualClock

    holders = {"d0": _Holder()}
    book, conv = PinBook(holders), ConversationState("c", turns=2)
    assert not await claim_turn(Down(), conv, book, holders, VirtualClock(), 0.0)  # type: ignore[arg-type]
    assert conv.next_turn(10).turn == 3  # from memory
    assert await agree_pin(Down(), "c", None, "d0") == "d0"  # type: ignore[arg-type]
    assert await agree_pin(NoHead(), "c", None, "d0") == "d0"  # type: ignore[arg-type]
    await finish_turn(Down(), conv, 3, datetime.now().astimezone())  # type: ignore[arg-type]  # logged only
