"""The policy interface: observations in, decisions out, as data.

One policy, two drivers: the live router (orchestrator/router/) and the simulator (orchestrator/sim/)
build a :class:`FleetView` from what they observe, call ``policy.place(turn, view)`` and apply the returned
:class:`Placement`. Nothing here reads a clock, a socket or a database.
Must not import fastapi, sqlalchemy, httpx or anything that reads wall-clock time.

THIS IS THE CONTRACT other packages code against; keep names and fields stable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable


class Role(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"  # does both

    @property
    def can_prefill_remote(self) -> bool:
        return self in (Role.PREFILL, Role.COLOCATED)

    @property
    def can_decode(self) -> bool:
        return self in (Role.DECODE, Role.COLOCATED)


@dataclass(frozen=True, slots=True)
class InstanceView:
    """What a driver can observe about one engine instance right now."""

    instance_id: str
    role: Role
    tier: str  # TierModel.name or the fleet's tier label
    healthy: bool = True
    queued_prefill_tokens: int = 0  # prefill tokens waiting or in progress
    kv_used_tokens: int = 0
    kv_capacity_tokens: int = 1
    running_seqs: int = 0
    waiting_seqs: int = 0
    pinned_conversations: int = 0
    # takes new conversations; False while a power controller drains or parks it (its pinned ones stay)
    accepting: bool = True

    @property
    def kv_free_tokens(self) -> int:
        return max(0, self.kv_capacity_tokens - self.kv_used_tokens)

    @property
    def kv_occupancy(self) -> float:
        return self.kv_used_tokens / self.kv_capacity_tokens if self.kv_capacity_tokens else 1.0


@dataclass(frozen=True, slots=True)
class FleetView:
    instances: tuple[InstanceView, ...]
    pins: Mapping[str, str] = field(default_factory=dict)  # conversation_id -> decoder instance_id

    def get(self, instance_id: str) -> InstanceView | None:
        for inst in self.instances:
            if inst.instance_id == instance_id:
                return inst
        return None

    def healthy(self, *roles: Role) -> tuple[InstanceView, ...]:
        return tuple(i for i in self.instances if i.healthy and (not roles or i.role in roles))


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """A turn as a policy sees it: only what is observable when it arrives."""

    conversation_id: str
    turn: int  # 1-based; turn 1 is the conversation's first
    input_tokens: int  # whole prompt of this turn (history + appended)
    new_tokens: int  # tokens appended since the previous turn (== input_tokens on turn 1)
    max_output_tokens: int | None = None  # what the client asked for, if anything

    @property
    def is_first(self) -> bool:
        return self.turn == 1


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one turn runs.

    prefill_instance None: prefill locally on the decode instance (from its prefix cache where it holds one).
    transfer_kv: the prefill instance's KV for ``transfer_tokens`` tokens is shipped to decode_instance.
    pin: bind the conversation to decode_instance for its later turns.
    history_tokens (remote prefill only): a KV round trip, as AMPD-style per-turn systems do for a turn they
    send to a prefiller: the conversation's first ``history_tokens`` tokens of KV are first shipped from
    decode_instance (which holds them) to prefill_instance, which then prefills only the rest. 0: none.
    """

    decode_instance: str
    prefill_instance: str | None = None
    transfer_kv: bool = False
    transfer_tokens: int = 0
    pin: bool = False
    reason: str = ""
    history_tokens: int = 0

    @property
    def remote_prefill(self) -> bool:
        return self.prefill_instance is not None and self.prefill_instance != self.decode_instance


@runtime_checkable
class Policy(Protocol):
    """An online placement policy. May keep its own state (predictors, counters), never read clocks or I/O."""

    name: str

    def place(self, turn: TurnRequest, view: FleetView) -> Placement:
        """Decide where `turn` runs. Raises PlacementError when no healthy instance can take it."""
        ...

    def observe_turn_end(self, conversation_id: str, turn: int, output_tokens: int) -> None:
        """Feedback after a turn finished (used by predictors); pure policies ignore it."""
        ...

    def forget(self, conversation_id: str) -> None:
        """The conversation ended; drop any per-conversation state."""
        ...
