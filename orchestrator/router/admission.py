"""The router's admission step: a bounded wait for KV room before a turn is placed (the seam for admission).

The rule per policy and what a turn reserves come from the driver core (orchestrator.core.admission, as the
simulator's ``--router-admission``). Live, only the turns so far are known: the reservation is the current
prompt + the client's output cap. A turn the rule reserves for waits until a healthy decode-capable instance
shows room for it in the fleet view, re-checking every ``RouterConfig.admission_poll_s``, at most
``RouterConfig.admission_wait_s``; :func:`wait_for_room` says whether room was found, and the router places
the turn either way (the wait is bounded, nothing is refused here).

Must not import fastapi, starlette or sqlalchemy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from conserve.clock import Clock
from orchestrator.core import AdmissionRule, has_room, reservation_tokens
from placement.base import FleetView, TurnRequest


def reservation(rule: AdmissionRule, treq: TurnRequest) -> int:
    """The decoder KV tokens turn `treq` reserves under `rule` (0: it rides on an earlier reservation)."""
    k = treq.turn
    inputs = [0] * (k - 1) + [treq.input_tokens]
    outputs = [0] * (k - 1) + [treq.max_output_tokens or 0]
    return reservation_tokens(rule, k, inputs, outputs)[0]


def has_decoder_room(view: FleetView, need_tokens: int) -> bool:
    return any(
        v.healthy and v.role.can_decode and has_room(v.kv_capacity_tokens, v.kv_used_tokens, need_tokens)
        for v in view.instances
    )


async def wait_for_room(
    rule: AdmissionRule,
    treq: TurnRequest,
    fleet_view: Callable[[], FleetView],
    clock: Clock,
    wait_s: float,
    poll_s: float,
    stats: dict[str, int],
) -> bool:
    """Wait (at most `wait_s`) until some healthy decode-capable instance has room for the turn's reservation.
    True: room was found (or the turn reserves nothing); False: the wait timed out. `stats` counts the turns
    that ``waited`` and those that ``timed_out``."""
    need = reservation(rule, treq)
    if need <= 0:
        return True
    deadline = clock.now_s() + wait_s
    waited = False
    while not has_decoder_room(fleet_view(), need):
        if clock.now_s() >= deadline:
            stats["timed_out"] += 1
            return False
        if not waited:
            waited = True
            stats["waited"] += 1
        await asyncio.sleep(poll_s)
    return True
