"""SimOptions.view_cached_histories: what a policy sees of an instance between two turns of an unpinned
conversation. By default the view counts the running sequences' KV only, as a live engine reports it (vLLM's
kv_cache_usage_perc counts no evictable cached block) and the live router shows it; the paper tables' option
(orchestrator.sim.paper.PAPER_SIM_OPTIONS) also counts the cached history of a conversation still going."""

from __future__ import annotations

from simkit import Inst, a40

from orchestrator.sim import SimOptions, run_simulation
from orchestrator.sim.paper import PAPER_SIM_OPTIONS
from orchestrator.workload import ConversationSpec, TurnSpec
from placement.base import Role
from placement.policies import make_policy

TM = a40()
FLEET = [Inst("c0", "a40", Role.COLOCATED, TM)]
# turn 1: 3,000 + 40 tokens; turn 2 one second later (round-robin never pins: nothing is counted on a pin)
CONV = ConversationSpec("a", 0.0, (TurnSpec(3000, 40), TurnSpec(100, 20, 1.0)))


def _turn2_used_kv(options: SimOptions) -> int:
    res = run_simulation(FLEET, [CONV], make_policy("round-robin"), options=options, energy_window_s=None)
    d = res.decisions[1]
    assert d.turn.turn == 2 and d.view is not None
    assert res.turns[1].cached_tokens > 0  # the history was still cached when turn 2 came
    return d.view.instances[0].kv_used_tokens


def test_by_default_a_cached_history_is_not_used_kv() -> None:
    assert _turn2_used_kv(SimOptions(record_views=True)) == 0


def test_the_paper_option_counts_the_cached_history_of_a_conversation_still_going() -> None:
    assert PAPER_SIM_OPTIONS.view_cached_histories
    assert _turn2_used_kv(SimOptions(record_views=True, view_cached_histories=True)) == 3040
