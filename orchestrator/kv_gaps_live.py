"""The KV-gap rule applied to live engines (issue 12 item 3, live side): keep, offload or drop the KV of a
pinned conversation while its tool gap runs.

:class:`GapKeeper` is a scheduled job of ``orchestrator serve`` (``CONSERVE_KV_GAP_INTERVAL_S``). Each run
looks at the router's pinned conversations that are idle (their last turn ended, no later turn numbered) and
still counted on their decoder, and asks the decision rule of placement/kv_gaps.py -- ``gap_action`` on the
time the conversation has been idle, the decoder's KV pressure as the router sees it (``kv_pressure`` of its
InstanceView: requests waiting, or its KV full) and the restore costs of its context on the decoder's tier
(``gap_costs``; a host-memory tier only where the engine declares ``kv_offload``). When the rule says OFFLOAD
or DROP, the keeper

1. asks the decoder's engine to release the conversation's KV (``Engine.release_kv``: the engine's own
   mechanism; vLLM on CPU drops with a new ``cache_salt``, orchestrator/engines/vllm.py);
2. stops counting the conversation's context on the decoder (``PinBook.account(conv, 0)``): the room is
   free for placement and admission; the pin stays (the next turn goes to the same decoder, which restores
   or re-prefills the context, and is counted again when it is placed);
3. records the release in the ledger as a pin row on the same decoder whose reason starts with ``kv offload``
   or ``kv drop`` (the API's replacement count ignores it: it counts reasons starting with "replaced").

The next turn's record then shows how it was served: ``cached_tokens`` (vLLM's
``usage.prompt_tokens_details.cached_tokens``) is 0 after a drop (the whole prompt was computed again),
instead of the context's full blocks when it was kept.

A turn that arrives while its conversation is being released (between the check and the engine's answer) is
served by the mechanism all the same; only its KV accounting is left to the turn (the keeper does not
uncount a conversation whose turn has started). Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from energy.records import PinRecord, TurnStatus
from placement.kv_gaps import GapAction, HostMemory, gap_action, gap_costs, kv_pressure
from tiers.perf import TierModel

if TYPE_CHECKING:
    from orchestrator.core.conversations import ConversationState
    from orchestrator.router.driver import Router

__all__ = ["GapKeeper", "GapRelease", "idle_context"]

log = logging.getLogger("orchestrator.kv_gaps")


@dataclass(frozen=True, slots=True)
class GapRelease:
    """One release the keeper applied."""

    conversation_id: str
    decoder: str
    action: GapAction
    idle_s: float
    context_tokens: int
    detail: str  # the engine's account of what it did


def idle_context(conv: ConversationState, last_status: TurnStatus | None, last_turn: int) -> int:
    """The context tokens an idle pinned conversation holds on its decoder, or 0 when it is not one to
    release: not pinned, a turn started after its last recorded one, that one did not end well, or its context
    is not (or no longer) counted there."""
    if conv.pin is None or conv.ended or last_status is not TurnStatus.OK or last_turn != conv.turns:
        return 0
    if conv.context_tokens <= 0 or conv.pinned_tokens != conv.context_tokens:
        return 0
    return conv.context_tokens


class GapKeeper:
    """Applies the gap rule to a live router's idle pinned conversations (module docstring).

    `tier_models`: each decoder's tier model (restore costs). `host`: the host-memory tier of a decoder whose
    engine declares ``kv_offload`` (None: none has one; every release is then a drop)."""

    def __init__(
        self, router: Router, tier_models: Mapping[str, TierModel], host: HostMemory | None = None
    ) -> None:
        self.router = router
        self.tier_models = tier_models
        self.host = host
        self._offloaded: dict[str, tuple[str, float]] = {}  # conversation -> (decoder, KV bytes in host)
        self.stats = {"ticks": 0, "kept": 0, "offloaded": 0, "dropped": 0, "failed": 0}

    def _host_free_bytes(self, decoder: str) -> float:
        if self.host is None:
            return 0.0
        held = sum(b for d, b in self._offloaded.values() if d == decoder)
        return max(0.0, self.host.capacity_bytes - held)

    async def tick(self, now_s: float | None = None) -> list[GapRelease]:
        """One pass over the idle pinned conversations; returns the releases applied."""
        router = self.router
        now_s = router.clock.now_s() if now_s is None else now_s
        convs, book = router.gap_state()
        views = {v.instance_id: v for v in router.fleet_view().instances}
        engines = router.engines
        self.stats["ticks"] += 1
        for cid in [c for c in self._offloaded if c not in convs or convs[c].pinned_tokens]:
            self._offloaded.pop(cid)  # restored by its next turn (counted again), or forgotten
        out: list[GapRelease] = []
        for conv in list(convs.values()):
            last = conv.records[-1] if conv.records else None
            tokens = idle_context(conv, last.status if last else None, last.turn if last else 0)
            dec = conv.pin
            if not tokens or dec is None or dec not in views or dec not in self.tier_models:
                continue
            engine = engines[dec]
            host = self.host if engine.kv_offload else None
            costs = gap_costs(tokens, self.tier_models[dec], host)
            idle_s = max(0.0, now_s - conv.last_active_s)
            action = gap_action(idle_s, kv_pressure(views[dec]), costs, self._host_free_bytes(dec))
            if action is GapAction.KEEP:
                self.stats["kept"] += 1
                continue
            try:
                done = await engine.release_kv(conv.conversation_id, action)
            except Exception as err:  # an engine that cannot release now keeps the KV; the next tick retries
                self.stats["failed"] += 1
                log.warning("KV of %s on %s kept: release failed: %s", conv.conversation_id, dec, err)
                continue
            if idle_context(conv, last.status if last else None, last.turn if last else 0):
                book.account(conv, 0)  # still idle: its room is free until its next turn is placed
            if action is GapAction.OFFLOAD:
                self._offloaded[conv.conversation_id] = (dec, costs.kv_bytes)
                self.stats["offloaded"] += 1
            else:
                self.stats["dropped"] += 1
            view = views[dec]
            why = f"waiting {view.waiting_seqs}, KV free {view.kv_free_tokens} tokens"
            reason = (
                f"kv {action.value}: idle {idle_s:.1f} s, {tokens} tokens, decoder under KV pressure ({why})"
            )
            rec = PinRecord(conv.conversation_id, dec, router.clock.wall(now_s), reason[:256])
            conv.pins.append(rec)  # GET /v1/conversations/{id} shows it, as the ledger does
            router.sink.pin(rec)
            out.append(GapRelease(conv.conversation_id, dec, action, idle_s, tokens, done.detail))
        return out
