"""The router's admission step: a bounded wait for KV room before a turn is numbered and placed, then a
refusal.

The rule per policy and what a turn reserves come from the driver core (orchestrator.core.admission, the same
rule the simulator's ``--router-admission`` applies). Live, only the turns so far are known: the reservation
is the current prompt + the client's output cap. A turn the rule reserves for waits until a healthy decode-
capable instance shows room for it in the fleet view (``orchestrator.core.any_room``), re-checking every
``RouterConfig.admission_poll_s``, at most ``RouterConfig.admission_wait_s``; after that it is refused with
:class:`AdmissionTimedOut` (the API answers 503 ``no_capacity`` with ``Retry-After``). The honest clock counts
the wait: it lies between the turn's arrival and its first token.

Must not import fastapi, starlette or sqlalchemy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from conserve.clock import Clock
from orchestrator.core import (
    AdmissionRule,
    Admit,
    admit,
    any_room,
    refusal_message,
    reservation_tokens,
    retry_after_s,
)
from orchestrator.router.values import AdmissionTimedOut
from placement.base import FleetView


def reservation(rule: AdmissionRule, turn: int, prompt_tokens: int, max_output_tokens: int | None) -> int:
    """The decoder KV tokens turn `turn` reserves under `rule` (0: it rides on an earlier reservation)."""
    pad = [0] * (turn - 1)
    return reservation_tokens(rule, turn, [*pad, prompt_tokens], [*pad, max_output_tokens or 0])[0]


async def admit_or_refuse(
    rule: AdmissionRule,
    turn: int,
    prompt_tokens: int,
    max_output_tokens: int | None,
    fleet_view: Callable[[], FleetView],
    clock: Clock,
    wait_s: float,
    poll_s: float,
    stats: dict[str, int],
) -> None:
    """Return once some healthy decode-capable instance has room for the turn's reservation (at once when it
    reserves nothing); raise :class:`AdmissionTimedOut` after `wait_s` without room. `stats` counts the turns
    that ``waited`` and those that ``timed_out``."""
    need = reservation(rule, turn, prompt_tokens, max_output_tokens)
    if need <= 0:
        return
    start, waited = clock.now_s(), False
    while True:
        waited_s = clock.now_s() - start
        decision = admit(any_room(fleet_view().instances, need), waited_s, wait_s)
        if decision is not Admit.WAIT:
            break
        if not waited:
            waited = True
            stats["waited"] += 1
        await asyncio.sleep(min(poll_s, wait_s - waited_s))
    if decision is Admit.REJECT:
        stats["timed_out"] += 1
        raise AdmissionTimedOut(refusal_message(need, wait_s), retry_after_s(wait_s))
