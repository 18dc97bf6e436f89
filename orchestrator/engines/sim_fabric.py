"""The 'network' between the simulated engines of one fleet (orchestrator/engines/sim.py): a prefiller
registers a KV handle, exactly one decoder claims it; every engine is attached with its link type, so a
hand-off runs over the slower of the two links (tiers.steps.handoff_link), as in the simulator.

Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from orchestrator.errors import EngineError

__all__ = ["KvHandle", "SimKvFabric"]

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
