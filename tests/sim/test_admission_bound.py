"""The bounded admission wait in the simulator (SimOptions.admission_wait_s): the rule serve applies
(orchestrator.core.admission.admit), a turn 1 that waited the bound is refused, its conversation counts as an
SLO violation, and the honest clock counts every admitted conversation's wait."""

from __future__ import annotations

import pytest
from simkit import agentic, disagg, small_gpu_model

from orchestrator.errors import SimulationError
from orchestrator.metrics import Convention, SloSpec, conversation_metrics, summarize
from orchestrator.sim import SimOptions, run_simulation
from orchestrator.sim.standalone import StandaloneCache
from placement.policies import make_policy


def crowd():  # type: ignore[no-untyped-def]
    # 12 conversations of ~1.2k-2.4k final tokens within 0.6 s on 2 decoders of ~4.5k KV tokens: some wait
    return agentic(12, first=800, turns=3, spacing_s=0.05, out=60)


def run(bound: float | None):  # type: ignore[no-untyped-def]
    opts = SimOptions(router_admission=True, admission_wait_s=bound)
    return run_simulation(disagg(small_gpu_model(), 1, 2), crowd(), make_policy("conserve"), options=opts,
                          energy_window_s=None)  # fmt: skip


def test_unbounded_waits_and_a_bound_refuses_the_long_waits() -> None:
    free = run(None)
    waits = sorted(c.admission_wait_s for c in free.conversations)
    assert free.refused_conversations == () and len(free.conversations) == 12
    assert waits[-1] > 0.2  # admission binds: the last conversations wait
    bound = 0.2
    res = run(bound)
    longer = sum(1 for w in waits if w >= bound)
    assert res.refused_conversations  # the bound refused some
    assert len(res.conversations) + len(res.refused_conversations) == 12
    assert all(c.admission_wait_s < bound for c in res.conversations)  # nobody admitted after the bound
    assert len(res.refused_conversations) <= longer  # refusals free room: later ones may get in sooner
    refused = set(res.refused_conversations)
    assert not any(t.conversation_id in refused for t in res.turns)  # no turn of theirs ran


def test_refused_conversations_are_slo_violations() -> None:
    res = run(0.2)
    tm = small_gpu_model()
    mets = conversation_metrics(res, crowd(), StandaloneCache(tm), SloSpec(), Convention.HONEST)
    s = summarize(res, mets, Convention.HONEST)
    k = len(res.refused_conversations)
    served_viol = sum(1 for m in mets if m.violates)
    assert s.refused_conversations == k > 0
    assert s.slo_violation_pct == pytest.approx(100.0 * (served_viol + k) / 12)
    assert "refused_conversations" in s.to_dict()


def test_a_negative_bound_is_refused() -> None:
    with pytest.raises(SimulationError, match="admission_wait_s"):
        SimOptions(router_admission=True, admission_wait_s=-1.0)


def test_the_cli_bound_needs_router_admission() -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    args = ["simulate", "--fleet", "examples/paper-a40.yaml", "--layout", "prefill=1,decode=3", "--json"]
    r = CliRunner().invoke(app, [*args, "--admission-wait", "5"])
    assert r.exit_code == 1 and "--admission-wait" in r.output and "--router-admission" in r.output
    assert "Traceback" not in r.output
