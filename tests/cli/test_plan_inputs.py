"""The planner's inputs from a workload (orchestrator.planner.inputs): a later turn's incremental prefill is
what the simulator (and vLLM's prefix cache) computes -- the appended tokens, the previous turn's output being
cached with its prompt."""

from __future__ import annotations

import pytest

from orchestrator.fleet import InstanceSpec
from orchestrator.planner import demand_from_stats
from orchestrator.sim import run_simulation
from orchestrator.workload import ConversationSpec, TurnSpec, workload_stats
from placement.base import Role
from placement.policies import make_policy
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel


def _convs() -> list[ConversationSpec]:
    a = (TurnSpec(3000, 200), TurnSpec(64, 300, 1.0), TurnSpec(128, 100, 1.0))
    b = (TurnSpec(1000, 50), TurnSpec(256, 80, 2.0))
    return [ConversationSpec("a", 0.0, a), ConversationSpec("b", 100.0, b)]


def test_tail_prefill_is_the_appended_tokens_over_the_cached_turn() -> None:
    d = demand_from_stats(workload_stats(_convs(), 1.0))
    assert d.tail_prefill_tokens == pytest.approx(((64 + 128) + 256) / 2)
    sh = {c.turn1_tokens: c for c in d.conv_shapes}
    assert sh[3000].tail_tokens == 64 + 128 and sh[1000].tail_tokens == 256
    # the cached context of a later turn includes the previous output
    assert sh[1000].tail_context_tokens == pytest.approx(1000 + 50)


def test_the_simulator_prefills_what_the_planner_counts() -> None:
    # one colocated instance, conversations far apart: each later turn hits its cached prompt + output and
    # prefills the appended tokens plus at most the partial last block (16 tokens)
    tm = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    convs = _convs()
    insts = [InstanceSpec("c0", "a40", Role.COLOCATED, tm)]
    res = run_simulation(insts, convs, make_policy("colocated"), energy_window_s=None)
    later = sum(t.prefilled_tokens for t in res.turns if t.turn > 1)
    planned = demand_from_stats(workload_stats(convs, 1.0)).tail_prefill_tokens * len(convs)
    assert planned <= later <= planned + 16 * 3
