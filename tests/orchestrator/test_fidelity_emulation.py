"""The artifact's harness through the mechanisms wired into the simulator (orchestrator.fidelity), on a
40-conversation slice of the paper's workload: each mechanism does what the artifact did, and only that."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import fidelity as fid
from orchestrator.artifact import ReplayPoint, replay_offsets_s, wrong_predicted_turns
from orchestrator.config import FleetConfig, load_fleet
from orchestrator.errors import SimulationError
from orchestrator.sim.standalone import StandaloneCache
from orchestrator.workload import workload_from_config
from placement.base import Role
from tiers.connector import wrong_predict_wait_s

N = 40
RATE = 1.634


@pytest.fixture(scope="module")
def cfg(shared_data: Path, repo_root: Path) -> FleetConfig:
    full = load_fleet(repo_root / "examples" / "paper-a40.yaml")
    return full.model_copy(update={"workload": full.workload.model_copy(update={"conversations": N})})


@pytest.fixture(scope="module")
def sa(cfg: FleetConfig) -> StandaloneCache:
    return fid.paper_standalone(cfg)


def test_prefiller_only_run_records_turn_one_through_the_prefiller(cfg: FleetConfig) -> None:
    base = workload_from_config(cfg.workload)
    sends = {c.conversation_id: 0.5 * k for k, c in enumerate(base)}
    recs, res = fid.prefiller_only_run(cfg, base, sends)
    assert len(recs) == N
    assert {r.conversation_id: r.send_s for r in recs} == sends
    assert all(t.turn == 1 and t.remote_prefill and t.output_tokens == 2 for t in res.turns)
    # proxy engines: no prefix cache, the whole prompt is prefilled and shipped
    assert all(t.prefilled_tokens == t.input_tokens == t.transfer_tokens for t in res.turns)
    assert not res.router_admission


def test_replayed_arrivals_are_the_recorded_events(cfg: FleetConfig, sa: StandaloneCache) -> None:
    col = fid.run_point(cfg, "colocated", RATE, 0, fid.Mechanisms(replay_arrivals=True), standalone=sa)
    base = workload_from_config(cfg.workload)
    recs, _ = fid.prefiller_only_run(cfg, base, fid.send_times(base, 2.0, 0))  # 1.634 replays 2 conv/s
    expect = replay_offsets_s(recs, ReplayPoint.PREFILL_START)
    got = {c.conversation_id: c.arrival_s for c in col.result.conversations}
    assert got == pytest.approx(expect)
    assert min(got.values()) == 0.0


def test_full_disaggregation_without_prefix_cache_reprefills_and_ships_everything(
    cfg: FleetConfig, sa: StandaloneCache
) -> None:
    p = fid.run_point(cfg, "full-disagg", 0.5, 0, fid.Mechanisms(proxy_no_prefix_cache=True), standalone=sa)
    turns = p.result.turns
    assert all(t.remote_prefill for t in turns)
    assert all(t.prefilled_tokens == t.input_tokens == t.transfer_tokens for t in turns)
    today = fid.run_point(cfg, "full-disagg", 0.5, 0, fid.Mechanisms(), standalone=sa)
    assert sum(t.prefilled_tokens for t in today.result.turns) < sum(t.prefilled_tokens for t in turns) / 3


def test_ampd_emulation_pins_and_injects_the_waits(cfg: FleetConfig, sa: StandaloneCache) -> None:
    mech = fid.Mechanisms(replay_arrivals=True, ampd_virtual_prefiller=True, wrong_prediction_rate=0.3)
    p = fid.run_point(cfg, "per-turn", RATE, 0, mech, standalone=sa)
    res = p.result
    assert res.policy == "per-turn"
    assert res.kv_transfers == N  # turn 1 only: no round trip, no migration
    assert all(len(set(c.decoders)) == 1 for c in res.conversations)
    base = workload_from_config(cfg.workload)
    wrong = wrong_predicted_turns([(c.conversation_id, len(c.turns)) for c in base], 0.3)
    assert set(p.waits_s) == set(wrong) and wrong
    ends = {(t.conversation_id, t.turn): t.last_token_s for t in res.turns}
    turns = {(t.conversation_id, t.turn): t for t in res.turns}
    for (cid, turn), wait in p.waits_s.items():
        assert wait >= wrong_predict_wait_s(0, 1, 114_688)  # at least the modelled wait's floor
        t = turns[(cid, turn)]
        # issued when the previous turn ended (no tool gap), placed only after the wait: TTFT counts it
        assert t.arrival_s == pytest.approx(ends[(cid, turn - 1)], abs=1e-9)
        assert t.prefill_start_s >= t.arrival_s + wait - 1e-9
    unaffected = [t for k, t in turns.items() if k[1] > 1 and k not in p.waits_s]
    assert unaffected and all(t.prefill_start_s == pytest.approx(t.arrival_s, abs=0.5) for t in unaffected)


def test_split_energy_window_bills_the_prefiller_over_its_own_run(
    cfg: FleetConfig, sa: StandaloneCache
) -> None:
    replay = fid.run_point(cfg, "conserve", RATE, 0, fid.Mechanisms(replay_arrivals=True), standalone=sa)
    mech = fid.Mechanisms(replay_arrivals=True, split_energy_window=True)
    split = fid.run_point(cfg, "conserve", RATE, 0, mech, standalone=sa)
    base = workload_from_config(cfg.workload)
    _, pre = fid.prefiller_only_run(cfg, base, fid.send_times(base, 2.0, 0))
    dec = sum(i.energy_j for i in split.result.instances if i.role != str(Role.PREFILL))
    pre_j = next(i.energy_j for i in pre.instances if i.role == str(Role.PREFILL))
    assert split.tokens_per_j == pytest.approx(split.result.tokens / (dec + pre_j), rel=1e-9)
    assert replay.tokens_per_j == pytest.approx(replay.result.tokens_per_j, rel=1e-9)
    # the honest summary always bills every GPU over the whole run
    assert split.honest.tokens_per_j == pytest.approx(split.result.tokens_per_j, rel=1e-9)


def test_unknown_configuration_is_named(cfg: FleetConfig) -> None:
    with pytest.raises(SimulationError, match="unknown configuration 'nope'"):
        fid.run_point(cfg, "nope", RATE, 0)


def test_the_paper_sweep_runs_through_the_harness_on_request(cfg: FleetConfig, sa: StandaloneCache) -> None:
    from orchestrator.sim.paper import run_sweep

    mech = fid.Mechanisms(replay_arrivals=True)
    runs = run_sweep(cfg, [RATE], [0], labels=["colocated"], harness=mech)
    direct = fid.run_point(cfg, "colocated", RATE, 0, mech, standalone=sa)
    run = runs[("colocated", RATE, 0)]
    assert run.artifact.ttfet_slowdown == direct.artifact.ttfet_slowdown
    assert run.honest.tokens_per_j == direct.honest.tokens_per_j
    plain = run_sweep(cfg, [RATE], [0], labels=["colocated"])[("colocated", RATE, 0)]
    assert plain.artifact.ttfet_slowdown != run.artifact.ttfet_slowdown  # the replay moved the arrivals
