"""Fleet views: what a policy sees of one instance, built the same way by every driver.

Used KV is the larger of what the engine holds (``resident``: running sequences' KV, and in the simulator the
cached prefixes of conversations still going) and the driver's own accounting: the KV tokens of the
conversations pinned to the instance (:mod:`orchestrator.core.pins`; counted even when the engine has evicted
them) and router-side admission reservations (:mod:`orchestrator.core.admission`). Pinned conversations can
hold more than the engine does and, when over-committed, more than its capacity: the policy sees at most a
full instance.
"""

from __future__ import annotations

from placement.base import InstanceView, Role


def kv_used_tokens(
    capacity_tokens: int, resident_tokens: int, pinned_tokens: int, reserved_tokens: int = 0
) -> int:
    """Used KV as policies see it: max(resident, pinned, reserved), capped at capacity."""
    used = resident_tokens
    if pinned_tokens > used:
        used = pinned_tokens
    if reserved_tokens > used:
        used = reserved_tokens
    return capacity_tokens if used > capacity_tokens else used


def instance_view(
    instance_id: str,
    role: Role,
    tier: str,
    *,
    healthy: bool,
    queued_prefill_tokens: int,
    resident_kv_tokens: int,
    pinned_kv_tokens: int,
    kv_capacity_tokens: int,
    running_seqs: int,
    waiting_seqs: int,
    pinned_conversations: int,
    reserved_kv_tokens: int = 0,
    accepting: bool = True,
) -> InstanceView:
    """One instance's :class:`InstanceView` from the driver's observations and accounting."""
    return InstanceView(
        instance_id=instance_id,
        role=role,
        tier=tier,
        healthy=healthy,
        queued_prefill_tokens=queued_prefill_tokens,
        kv_used_tokens=kv_used_tokens(
            kv_capacity_tokens, resident_kv_tokens, pinned_kv_tokens, reserved_kv_tokens
        ),
        kv_capacity_tokens=kv_capacity_tokens,
        running_seqs=running_seqs,
        waiting_seqs=waiting_seqs,
        pinned_conversations=pinned_conversations,
        accepting=accepting,
    )
