"""The driver core: everything around ``policy.place()`` that the live router and the simulator share.

One policy, one driver core, two drivers (DESIGN.md section 3). The live router (orchestrator/router.py) adds
HTTP engines and the ledger; the simulator (orchestrator/sim/engine.py) adds virtual time and the instance
model. Both take from here, and from nowhere else:

- :mod:`.views`      building an instance's :class:`placement.base.InstanceView` (used KV = max(resident,
                     pinned, reserved), capped at capacity);
- :mod:`.conversations` conversation state: turns, context, the new tokens of a turn, where its KV lives,
                     its summary once a final turn ends (:class:`ConversationState`);
- :mod:`.pins`       pin state: which decoder holds each conversation and the KV tokens it is counted for
                     there (:class:`PinBook`);
- :mod:`.turns`      the meaning of every :class:`placement.base.Placement` field (whether the pin moves, the
                     prefill split of a remote placement, a KV round trip's history, the KV shipped, the
                     tokens a turn is counted for on its pin);
- :mod:`.failures`   what an instance failure does to the turns it touches (when they are re-placed, what
                     an abandoned prefill leaves);
- :mod:`.admission`  router-side KV admission: the rule per policy and what a turn reserves;
- :mod:`.summary`    the per-conversation summary: TTFET, E2E and the slowdowns, computed once.

Pure and deterministic: no clock, no I/O, no randomness. Imports only placement/ (the policy contract).
Must not import fastapi, sqlalchemy, httpx, orchestrator.router or orchestrator.sim.
"""

from orchestrator.core.admission import (
    AdmissionRule,
    Reserve,
    growth_tokens,
    has_room,
    reservation_tokens,
    rule_for,
)
from orchestrator.core.conversations import ConversationState
from orchestrator.core.failures import abandoned_prefill_cached_tokens, handoff_refused
from orchestrator.core.pins import PinBook, PinHolder, PinnedConversation, PinState
from orchestrator.core.summary import (
    ConversationTimes,
    TurnTimes,
    conversation_times,
    final_turn_times,
    slowdowns,
)
from orchestrator.core.turns import (
    kv_shipped_tokens,
    local_prefill_tokens,
    moves_pin,
    pin_reason,
    remote_prefill_tokens,
    round_trip_tokens,
    running_turn_kv_tokens,
)
from orchestrator.core.views import instance_view, kv_used_tokens

__all__ = [
    "AdmissionRule",
    "ConversationState",
    "ConversationTimes",
    "PinBook",
    "PinHolder",
    "PinnedConversation",
    "PinState",
    "Reserve",
    "TurnTimes",
    "abandoned_prefill_cached_tokens",
    "conversation_times",
    "final_turn_times",
    "growth_tokens",
    "handoff_refused",
    "has_room",
    "instance_view",
    "kv_shipped_tokens",
    "kv_used_tokens",
    "moves_pin",
    "local_prefill_tokens",
    "pin_reason",
    "remote_prefill_tokens",
    "reservation_tokens",
    "round_trip_tokens",
    "rule_for",
    "running_turn_kv_tokens",
    "slowdowns",
]
