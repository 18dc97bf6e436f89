"""Conversation and pin state: which decoder holds each conversation, and the KV it is counted for there.

A pin binds a conversation to one decoder until the conversation ends, times out, or the policy re-places it
(``Placement.pin`` to another instance; orchestrator.core.turns.moves_pin). While pinned, the conversation is
counted on its decoder for (orchestrator.core.turns): its prompt (+ the client's output cap, when it gave one)
while a turn runs, its whole context (prompt + output) between turns. A decoder's pinned tokens are the sum
over its pinned conversations, and feed its view (orchestrator.core.views).

The book keeps the conversation -> decoder map (what ``FleetView.pins`` shows; the same dict object, never
copied, so a view built from it is current) and updates the tallies on the drivers' own instance objects,
which carry ``pinned`` (the set of conversation ids pinned there) and ``pinned_tokens``: the router's and the
simulator's instances, so their views read the tallies without a lookup.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class PinHolder(Protocol):
    """A driver's instance as the pin book updates it."""

    pinned: set[str]
    pinned_tokens: int


class PinnedConversation(Protocol):
    """A driver's conversation as the pin book updates it."""

    conversation_id: str
    pin: str | None
    pinned_tokens: int


class PinBook:
    """Pins of one driver. ``holders`` is the driver's instance map (id -> instance), read live."""

    __slots__ = ("holders", "pins")

    def __init__(self, holders: Mapping[str, PinHolder]) -> None:
        self.holders = holders
        self.pins: dict[str, str] = {}  # conversation -> decoder: FleetView.pins

    def pin(self, conv: PinnedConversation, instance_id: str) -> str | None:
        """Bind `conv` to `instance_id` (releasing any previous pin and the tokens counted there); returns the
        previous decoder, or None. Tokens restart at 0 on the new decoder (set them with :meth:`account`)."""
        old = self.unpin(conv)
        self.holders[instance_id].pinned.add(conv.conversation_id)
        conv.pin = instance_id
        self.pins[conv.conversation_id] = instance_id
        return old

    def unpin(self, conv: PinnedConversation) -> str | None:
        """Release `conv`'s pin and its counted tokens; returns the decoder it was pinned to, or None."""
        old = conv.pin
        if old is None:
            return None
        holder = self.holders.get(old)
        if holder is not None:
            holder.pinned.discard(conv.conversation_id)
            holder.pinned_tokens -= conv.pinned_tokens
        self.pins.pop(conv.conversation_id, None)
        conv.pin = None
        conv.pinned_tokens = 0
        return old

    def account(self, conv: PinnedConversation, tokens: int) -> str | None:
        """Count `conv` for `tokens` KV tokens on its decoder (none: no-op); returns that decoder or None."""
        iid = conv.pin
        if iid is None:
            return None
        self.holders[iid].pinned_tokens += tokens - conv.pinned_tokens
        conv.pinned_tokens = tokens
        return iid


class PinState:
    """The minimal conversation a driver without its own conversation object pins (the simulator)."""

    __slots__ = ("conversation_id", "pin", "pinned_tokens")

    def __init__(self, conversation_id: str) -> None:
        self.conversation_id = conversation_id
        self.pin: str | None = None
        self.pinned_tokens = 0
