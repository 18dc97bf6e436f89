"""The router's instances: what it knows of each engine (health, last observation, its own in-flight and pin
accounting), the view policies see of it, and the health poll.

Health: an engine that cannot be reached by a request is marked down at once (orchestrator.router.failures);
a health poll marks an engine down after ``down_after_failed_polls`` failed polls in a row and brings it back
on its first good poll.

Must not import fastapi, starlette or sqlalchemy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.core import instance_view
from orchestrator.engines.base import Engine, EngineObservation
from orchestrator.router.values import PromptTooLarge
from placement.base import InstanceView, Role

log = logging.getLogger("orchestrator.router")


@dataclass(slots=True, eq=False)
class Instance:
    engine: Engine
    instance_id: str
    role: Role
    tier: str
    healthy: bool = True
    down_reason: str | None = None
    failed_polls: int = 0  # consecutive
    obs: EngineObservation | None = None
    kv_capacity_tokens: int = 1
    inflight_prefill_tokens: int = 0
    inflight_requests: int = 0
    pinned_tokens: int = 0
    pinned: set[str] = field(default_factory=set)
    kv_transfers_in: int = 0
    accepting: bool = True  # takes new conversations (False: drained or parked by the power controller)
    # the last view and what it was built from: every request builds the fleet view, and an unchanged instance
    # (all but one or two per request) returns its previous one. 64 instances: 270 -> 30 us per fleet view
    # (timeit), 409 -> 259 us loop CPU per request (benchmarks/bench_router_inproc.py --engines 64);
    # tests/orchestrator/test_router_views.py checks a reused view always equals a fresh one
    _view_key: tuple[Any, ...] | None = field(default=None, repr=False)
    _view: InstanceView | None = field(default=None, repr=False)

    def view(self) -> InstanceView:
        """This instance as policies see it; the same object again while nothing it is built from changed."""
        key = (
            self.obs,  # replaced, never mutated (frozen), by each poll
            self.healthy,
            self.inflight_prefill_tokens,
            self.inflight_requests,
            self.pinned_tokens,
            len(self.pinned),
            self.kv_capacity_tokens,
            self.accepting,
        )
        if key != self._view_key or self._view is None:
            self._view, self._view_key = self._build_view(), key
        return self._view

    def _build_view(self) -> InstanceView:
        obs = self.obs
        used = int(obs.kv_usage_frac * self.kv_capacity_tokens) if obs is not None else 0
        # used KV = max(resident, pinned), capped (orchestrator.core.views, as in the simulator)
        return instance_view(
            self.instance_id,
            self.role,
            self.tier,
            healthy=self.healthy,
            queued_prefill_tokens=self.inflight_prefill_tokens,
            resident_kv_tokens=used,
            pinned_kv_tokens=self.pinned_tokens,
            kv_capacity_tokens=self.kv_capacity_tokens,
            running_seqs=max(obs.running if obs is not None else 0, self.inflight_requests),
            waiting_seqs=obs.waiting if obs is not None else 0,
            pinned_conversations=len(self.pinned),
            accepting=self.accepting,
        )

    def status(self) -> dict[str, Any]:
        """Id, role, tier, health, KV occupancy, queues, pins (GET /v1/fleet, /metrics)."""
        v = self.view()
        obs = self.obs
        return {
            "instance_id": self.instance_id,
            "role": str(self.role),
            "tier": self.tier,
            "healthy": self.healthy,
            "down_reason": self.down_reason,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "kv_used_tokens": v.kv_used_tokens,
            "kv_occupancy": v.kv_occupancy,
            "engine_kv_usage_frac": obs.kv_usage_frac if obs is not None else None,
            "running": obs.running if obs is not None else 0,
            "waiting": obs.waiting if obs is not None else 0,
            "inflight_requests": self.inflight_requests,
            "queued_prefill_tokens": self.inflight_prefill_tokens,
            "pinned_conversations": len(self.pinned),
            "accepting": self.accepting,
            "pinned_tokens": self.pinned_tokens,
            "kv_transfers_in": self.kv_transfers_in,
            "engine": dict(obs.extra) if obs is not None else {},
        }

    def mark_down(self, reason: str) -> None:
        if self.healthy:
            self.healthy = False
            self.down_reason = reason
            log.warning("instance %s marked down: %s", self.instance_id, reason)

    async def poll(self, timeout_s: float, down_after_failed_polls: int) -> None:
        """Observe the engine once: update the observation and health."""
        try:
            obs = await asyncio.wait_for(self.engine.observe_shared(), timeout_s)
        except Exception as err:  # an engine we cannot observe is failing, whatever the cause
            self._poll_failed(f"observe failed: {type(err).__name__}: {err}", down_after_failed_polls)
            return
        if not obs.healthy:
            self._poll_failed(obs.error or "engine reports unhealthy", down_after_failed_polls)
            return
        self.obs = obs
        self.failed_polls = 0
        if obs.kv_capacity_tokens > 0:
            self.kv_capacity_tokens = obs.kv_capacity_tokens
        if not self.healthy:
            log.warning("instance %s is back up (was down: %s)", self.instance_id, self.down_reason)
        self.healthy, self.down_reason = True, None

    def _poll_failed(self, reason: str, limit: int) -> None:
        self.failed_polls += 1
        n = self.failed_polls
        if n >= limit:
            self.mark_down(f"{reason} ({n} polls in a row)")
        elif self.healthy:
            log.info("instance %s: health poll %d of %d failed: %s", self.instance_id, n, limit, reason)


def check_fits(instances: Iterable[Instance], need_tokens: int) -> None:
    """A turn that no decode-capable instance could hold (prompt + max_tokens over the largest KV capacity)
    is the client's error: PromptTooLarge (API: 400) before placement, so no engine is tried, fails or is
    marked down for it. Instances that are down count: their capacity comes back."""
    largest = max((i.kv_capacity_tokens for i in instances if i.role.can_decode), default=0)
    if need_tokens > largest:
        raise PromptTooLarge(
            f"this turn needs ~{need_tokens} tokens of KV cache (prompt + max_tokens), more than any "
            f"instance of this fleet holds: the largest decode-capable instance holds {largest} tokens. "
            "To fix: shorten the prompt or lower max_tokens.",
            limit_tokens=largest,
        )
