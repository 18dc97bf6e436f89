"""Acceptance of issue 11: the live router and the simulator are two drivers of one core.

The same workload -- a prefiller and three decoders, five agentic conversations whose turns overlap, and a
decoder failure mid-run -- runs through the live router (orchestrator.router.Router over the simulated engines
of `serve --backend sim`, on a virtual-time event loop: tests/core/vloop.py) and through the discrete-event
simulator, for every policy. Every ``policy.place`` call is recorded by the same wrapper
(tests/core/parity.py): the two drivers must make identical placements in the same order (decoder, prefiller,
pin, round-trip history, and the pin each view showed), record the same pins and count the same tokens per
turn; TTFET agrees within
``TTFET_REL`` (the two engine models are different code: SimEngine's own batching loop and A40 KV-transfer
constants vs the simulator's instance model and tiers.links; issue 11 item 3).

The simulator runs with ``SimOptions(view_cached_histories=False)``: its views then count what a live engine
reports. With the default (its prefix-cache entries of conversations still going counted as used, the setting
the fidelity tables were measured with) the policies that read unpinned KV decide differently; a strict xfail
records that divergence so it cannot go unnoticed. Another records where failure handling differs: a
decoder that fails while a turn's remote prefill for it runs; the simulator re-places the turn at once, the
router only when the prefill returns and the decoder refuses the hand-off (the prefill's work is lost and
later decisions shift).
"""

from __future__ import annotations

import pytest
from parity import Inst, LiveRun, Recording, run_live, run_sim, sim_tokens

from orchestrator.core import moves_pin
from orchestrator.sim import SimOptions, SimResult
from orchestrator.workload import ConversationSpec, TurnSpec
from placement.base import Placement, Role
from placement.policies import POLICY_NAMES, make_policy
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel

TM = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))  # the paper's GPU and model
FLEET = [Inst("p0", "a40", Role.PREFILL, TM)] + [Inst(f"d{i}", "a40", Role.DECODE, TM) for i in range(3)]
# d1 fails at 3.0 s: every policy has used it by then and has a turn running there (restarted), and
# conserve's and colocated's conversations pinned there move
FAIL_AT_S = 3.0
FAILURES = [("d1", FAIL_AT_S)]
# turn 1: 3-7k-token prompts; three follow-ups after ~1 s tool gaps; a new conversation every 0.7 s, so turns
# of different conversations run at the same time
CONVS = [
    ConversationSpec(
        f"c{i}",
        0.7 * i,
        (TurnSpec(3000 + 1000 * i, 30 + 5 * i),)
        + tuple(TurnSpec(60 + 11 * k, 20 + 3 * k, 0.9 + 0.13 * i) for k in range(3)),
    )
    for i in range(5)
]
OPTIONS = {"per-turn": {"mispredict_rate": 0.3, "seed": 3}}  # round trips happen
# measured on this workload: <= 0.02% (0.9 ms) for every policy but per-turn, 0.49% (20 ms): the simulator
# charges the artifact's KV bookkeeping per round trip (sim/steps.py, tiers.connector KV_MGMT_*), which
# SimEngine does not model
TTFET_REL = 0.01


def _runs(name: str, options: SimOptions | None = None) -> tuple[LiveRun, Recording, SimResult]:
    live = run_live(FLEET, CONVS, make_policy(name, **OPTIONS.get(name, {})), FAILURES)
    rec, res = run_sim(FLEET, CONVS, make_policy(name, **OPTIONS.get(name, {})), FAILURES, options)
    return live, rec, res


@pytest.fixture(scope="module", params=POLICY_NAMES)
def runs(request: pytest.FixtureRequest) -> tuple[str, LiveRun, Recording, SimResult]:
    return (request.param, *_runs(request.param))


def test_the_scenario_has_prefills_overlapping_turns_and_a_failure(runs) -> None:  # type: ignore[no-untyped-def]
    name, _, rec, res = runs
    spans = sorted((t.arrival_s, t.last_token_s, t.conversation_id) for t in res.turns)
    assert any(a[1] > b[0] and a[2] != b[2] for i, a in enumerate(spans) for b in spans[i + 1 :]), (
        "no two conversations' turns overlap"
    )
    before = [c for c, t in zip(rec.calls, _times(res), strict=True) if t < FAIL_AT_S]
    after = [c for c, t in zip(rec.calls, _times(res), strict=True) if t >= FAIL_AT_S]
    assert any(c.decode_instance == "d1" for c in before) and after
    assert not any(c.decode_instance == "d1" for c in after)
    assert any(t.restarts for t in res.turns)  # a turn was running on d1 when it failed
    if name not in ("colocated", "round-robin", "kv-aware"):  # those never use the prefiller
        assert any(c.prefill_instance == "p0" for c in rec.calls)
    if name in ("conserve", "colocated"):  # a pinned conversation lost its decoder and moved
        assert any(c.pin_before == "d1" and c.decode_instance != "d1" for c in after)


def _times(res: SimResult) -> list[float]:
    return [d.time_s for d in res.decisions]


def test_identical_placements_pins_and_order(runs) -> None:  # type: ignore[no-untyped-def]
    name, live, rec, _ = runs
    assert live.calls.calls == rec.calls, name


def test_identical_pin_records(runs) -> None:  # type: ignore[no-untyped-def]
    """The router's recorded pins (ledger rows) are exactly the pin moves the simulator made."""
    name, live, rec, _ = runs
    moves = [
        (c.conversation_id, c.decode_instance)
        for c in rec.calls
        if moves_pin(Placement(c.decode_instance, pin=c.pin), c.pin_before)
    ]
    assert [(p.conversation_id, p.instance_id) for p in live.pins] == moves
    assert bool(moves) == (name in ("conserve", "colocated"))


def test_identical_token_counts_per_conversation(runs) -> None:  # type: ignore[no-untyped-def]
    _, live, _, res = runs
    assert live.ok_tokens() == sim_tokens(res)
    assert live.resent == 0


def test_ttfet_within_the_engine_models_tolerance(runs) -> None:  # type: ignore[no-untyped-def]
    _, live, _, res = runs
    for c in res.conversations:
        assert live.ttfet_s[c.conversation_id] == pytest.approx(c.ttfet_s, rel=TTFET_REL), c.conversation_id


@pytest.mark.parametrize("name", ["conserve", "colocated", "round-robin"])
def test_default_simulator_views_agree_for_policies_that_read_no_unpinned_kv(name: str) -> None:
    live, rec, _ = _runs(name, SimOptions())
    assert live.calls.calls == rec.calls


@pytest.mark.xfail(
    strict=True,
    reason="the simulator's default views count its cached histories of unpinned conversations as used KV, "
    "which no live engine reports (SimOptions.view_cached_histories)",
)
@pytest.mark.parametrize("name", ["per-turn", "full-disagg", "kv-aware"])
def test_default_simulator_views_diverge_where_unpinned_kv_is_read(name: str) -> None:
    live, rec, _ = _runs(name, SimOptions())
    assert live.calls.calls == rec.calls


@pytest.mark.xfail(
    strict=True,
    reason="the router notices a failed decoder only when the turn's remote prefill returns and the hand-off "
    "fails (the simulator re-places the turn at the failure)",
)
def test_a_decoder_failing_during_its_turns_remote_prefill() -> None:
    failures = [("d0", 2.2)]  # c3's turn-1 prefill for d0 runs on p0 at 2.2 s
    live = run_live(FLEET, CONVS, make_policy("per-turn", **OPTIONS["per-turn"]), failures)
    rec, res = run_sim(FLEET, CONVS, make_policy("per-turn", **OPTIONS["per-turn"]), failures)
    assert [(t.conversation_id, t.turn) for t in res.turns if t.restarts] == [("c3", 1)]
    assert live.calls.calls == rec.calls
