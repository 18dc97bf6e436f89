"""Parity: the decisions the simulator made are the decisions the policy makes through the live interface.

The simulator records every policy call (placements with the FleetView it observed, and turn-end feedback) in
order. Replaying them through a *fresh* policy object via placement.base.Policy, the interface the live router
(orchestrator/router/) calls -- must give identical placements, including for the stateful, seeded per-turn
policy.
"""

from __future__ import annotations

import pytest
from simkit import a40, agentic, colocated, disagg

from orchestrator.sim import SimOptions, run_simulation
from placement.base import FleetView, Policy
from placement.policies import POLICY_NAMES, make_policy

OPTIONS = {"per-turn": {"mispredict_rate": 0.2, "seed": 7}}


def replay(policy: Policy, decisions, feedback) -> list:  # type: ignore[no-untyped-def]
    calls = sorted(
        [(d.order, "place", d) for d in decisions] + [(f.order, "obs", f) for f in feedback],
        key=lambda x: x[0],
    )
    got = []
    for _, kind, item in calls:
        if kind == "place":
            assert isinstance(item.view, FleetView)
            got.append(policy.place(item.turn, item.view))
        else:
            policy.observe_turn_end(item.conversation_id, item.turn, item.output_tokens)
            if item.final:
                policy.forget(item.conversation_id)
    return got


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_replay_through_policy_interface_gives_same_decisions(name: str) -> None:
    tm = a40()
    insts = colocated(tm, 3) if name in ("colocated", "round-robin", "kv-aware") else disagg(tm, 1, 3)
    convs = agentic(16, gap_s=0.4, turns=4, spacing_s=0.2)
    res = run_simulation(
        insts,
        convs,
        make_policy(name, **OPTIONS.get(name, {})),
        options=SimOptions(record_views=True),
        energy_window_s=None,
    )
    assert len(res.decisions) == sum(len(c.turns) for c in convs)
    fresh = make_policy(name, **OPTIONS.get(name, {}))
    assert replay(fresh, res.decisions, res.feedback) == [d.placement for d in res.decisions]
    # the views really carry load information (otherwise parity would be trivial)
    assert any(v.kv_used_tokens > 0 for d in res.decisions for v in d.view.instances)


def test_replay_detects_a_different_policy() -> None:
    """The parity check can fail: another seed of the per-turn policy decides differently."""
    tm = a40()
    res = run_simulation(
        disagg(tm, 1, 3),
        agentic(16, gap_s=0.4),
        make_policy("per-turn", mispredict_rate=0.3, seed=1),
        options=SimOptions(record_views=True),
        energy_window_s=None,
    )
    other = make_policy("per-turn", mispredict_rate=0.3, seed=2)
    assert replay(other, res.decisions, res.feedback) != [d.placement for d in res.decisions]
