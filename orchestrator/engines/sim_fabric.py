"""Where the simulated engines' KV lives (orchestrator/engines/sim.py): the 'network' between the engines of
one fleet (a prefiller registers a KV handle, exactly one decoder claims it; every engine is attached with its
link type, so a hand-off runs over the slower of the two links, tiers.steps.handoff_link, as in the
simulator) and each engine's prefix cache.

Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from orchestrator.errors import EngineError

__all__ = ["KvHandle", "PrefixCache", "SimKvFabric"]

DEFAULT_LINK = "pcie"  # the simulator's default link of a tier with none given (orchestrator.sim.core)


@dataclass(slots=True)
class KvHandle:
    source: str
    conversation_id: str
    tokens: int
    link: str = DEFAULT_LINK  # the source engine's link
    round_trip: bool = False  # the prefill pulled the conversation's history from a decoder first
    claimed: bool = False


class SimKvFabric:
    """KV handles between simulated engines and the link each engine sits on."""

    def __init__(self) -> None:
        self._handles: dict[str, KvHandle] = {}
        self._links: dict[str, str] = {}
        self._ids = itertools.count(1)

    def attach(self, engine_id: str, link: str) -> None:
        self._links[engine_id] = str(link)

    def link_of(self, engine_id: str | None) -> str:
        return self._links.get(engine_id or "", DEFAULT_LINK)

    def register(self, source: str, conversation_id: str, tokens: int, round_trip: bool = False) -> str:
        transfer_id = f"{source}-xfer-{next(self._ids)}"
        self._handles[transfer_id] = KvHandle(
            source, conversation_id, tokens, self.link_of(source), round_trip
        )
        return transfer_id

    def claim(self, transfer_id: str) -> KvHandle:
        handle = self._handles.pop(transfer_id, None)
        if handle is None:
            raise EngineError(
                f"KV transfer {transfer_id!r} is unknown or was already claimed. "
                "To fix: forward the kv_transfer_params of a fresh prefill() exactly once."
            )
        handle.claimed = True
        return handle

    @property
    def pending(self) -> int:
        return len(self._handles)


class PrefixCache:
    """One engine's prefix cache: conversation -> tokens of KV kept after its last request (LRU order),
    evicted (the last victim trimmed, keeping its prefix) only when an admission needs the room, as the
    simulator's instance does."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, int] = OrderedDict()
        self.total = 0

    def get(self, conversation_id: str) -> int:
        return self._entries.get(conversation_id, 0)

    def put(self, conversation_id: str, tokens: int) -> None:
        self.take(conversation_id)
        self._entries[conversation_id] = tokens
        self.total += tokens

    def take(self, conversation_id: str) -> int:
        tokens = self._entries.pop(conversation_id, 0)
        self.total -= tokens
        return tokens

    def clear(self) -> None:
        self._entries.clear()
        self.total = 0

    def evict(self, room: int) -> None:
        """Evict least recently used entries until at most ``room`` tokens stay cached."""
        while self._entries and self.total > room:
            cid, tokens = self._entries.popitem(last=False)
            over = self.total - room
            if tokens > over:  # trim the entry's tail, keep its prefix
                self._entries[cid] = tokens - over
                self._entries.move_to_end(cid, last=False)
                self.total -= over
            else:
                self.total -= tokens
