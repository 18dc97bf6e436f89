"""Standalone latencies for the slowdown metrics: each conversation simulated alone on one idle colocated
instance of the reference tier (DESIGN.md section 2). Lives with the simulator, not in orchestrator.metrics:
the metrics take standalone figures as input and never run a simulation (the layering contract)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from orchestrator.metrics import Standalone
from orchestrator.sim.core import SimOptions, run_simulation
from orchestrator.workload import ConversationSpec, TurnSpec
from placement.base import Role
from placement.policies import ColocatedPolicy
from tiers.perf import TierModel

__all__ = ["StandaloneCache"]


@dataclass(frozen=True, slots=True)
class _RefInstance:
    instance_id: str
    tier: str
    role: Role
    tier_model: TierModel


class StandaloneCache:
    """Standalone latencies: each conversation simulated alone on one idle colocated reference instance.

    Owned by the caller (no module-level state); keyed by the conversation's turns, so conversations with the
    same shape share one run.
    """

    def __init__(
        self, reference: TierModel, options: SimOptions | None = None, reference_prefix_cache: bool = True
    ) -> None:
        self.reference = reference
        # the normaliser is the conversation alone on an idle instance of the *reference engine*: no
        # router-side admission, and prefix caching as that engine has it (vLLM's default, on; the paper's
        # normaliser ran plain `vllm serve`, conserve/src/scheduler.py run_conversation_serial), whatever the
        # run under test does (e.g. the artifact's proxy path without prefix caching, SimOptions.prefix_cache)
        self.options = replace(
            options or SimOptions(),
            router_admission=False,
            prefix_cache=reference_prefix_cache,
            prefiller_prefix_cache=reference_prefix_cache,
            power_controller=None,  # the normaliser runs at the reference tier's own cap
        )
        self._cache: dict[tuple[TurnSpec, ...], Standalone] = {}

    def get(self, conv: ConversationSpec) -> Standalone:
        key = tuple(conv.turns)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        inst = _RefInstance("standalone", self.reference.name, Role.COLOCATED, self.reference)
        alone = ConversationSpec(conv.conversation_id, 0.0, conv.turns)
        res = run_simulation([inst], [alone], ColocatedPolicy(), energy_window_s=None, options=self.options)
        c = res.conversations[0]
        ttft = tuple(t.ttft_s for t in res.turns)
        out = Standalone(c.ttfet_s, c.e2e_s, c.last_turn_tbt_mean_s, c.last_turn_tbt_p95_s, ttft)
        self._cache[key] = out
        return out
