"""The profiler's sweep core, driven by a virtual engine in virtual time (no HTTP, no sleeping, no mocks).

The virtual engine answers with latencies from a known law and advances a shared clock by them; meters read
that clock: a constant-power "measured" meter (a real Meter implementation) and the energy helper's
ModelMeter. The live vLLM path is covered by tests/integration/test_profile_vllm.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from energy.meters import Meter, MeterReading, ModelMeter
from energy.records import Source
from orchestrator.profiling import (
    ActivityLog,
    DecodeClock,
    SweepPlan,
    build_profile,
    run_sweep,
)
from orchestrator.profiling_vllm import parse_decode_clock
from tiers.catalog import get_gpu
from tiers.errors import ProfileError
from tiers.models import get_model
from tiers.perf import TierModel
from tiers.profiles import apply_profile, parse_profile, profile_to_dict

STEP_BASE_S, STEP_PER_SEQ_S = 0.010, 0.0005  # the virtual engine's decode law
PREFILL_BASE_S, PREFILL_PER_TOKEN_S = 0.050, 0.0001  # unlike any catalog tier's roofline


class VirtualClock:
    def __init__(self) -> None:
        self.t = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.t

    def advance(self, s: float) -> None:
        self.t += timedelta(seconds=s)


class VirtualEngine:
    max_model_len_tokens = 4096

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.calls: list[tuple[str, int, int, int]] = []

    async def prefill_once(self, new_tokens: int) -> float:
        s = PREFILL_BASE_S + PREFILL_PER_TOKEN_S * new_tokens
        self.clock.advance(s)
        self.calls.append(("prefill", 1, new_tokens, 1))
        return s

    async def run_batch(self, batch: int, prompt_tokens: int, output_tokens: int) -> float:
        s = PREFILL_BASE_S + PREFILL_PER_TOKEN_S * prompt_tokens * batch
        s += (output_tokens - 1) * (STEP_BASE_S + STEP_PER_SEQ_S * batch)
        self.clock.advance(s)
        self.calls.append(("batch", batch, prompt_tokens, output_tokens))
        return s

    async def decode_clock(self) -> DecodeClock | None:
        return None  # no engine-side clock: the sweep times steps from the client's wall times


class ConstantPowerMeter:
    """A Meter whose GPU draws `power_w` all the time (stands for a hardware counter)."""

    source = Source.MEASURED

    def __init__(self, clock: VirtualClock, power_w: float) -> None:
        self.meter_id, self.gpu_indices, self.clock, self.power_w = "const", (0,), clock, power_w
        self.t0 = clock()

    def read(self) -> MeterReading:
        return MeterReading(self.clock(), {0: (self.clock() - self.t0).total_seconds() * self.power_w})

    def close(self) -> None:
        return None


PLAN = SweepPlan(prefill_lengths_tokens=(64, 512), decode_batches=(1, 8), decode_contexts_tokens=(256, 2048),
                 decode_steps=16, repeats=2, idle_s=0.0)  # fmt: skip


async def test_measured_meter_points_follow_the_engine() -> None:
    clock = VirtualClock()
    eng = VirtualEngine(clock)
    meter = ConstantPowerMeter(clock, power_w=100.0)
    assert isinstance(meter, Meter)
    res = await run_sweep(eng, meter, PLAN, energy_measured=True)
    assert [p.new_tokens for p in res.prefill] == [64, 512]
    for p in res.prefill:
        expect_s = PREFILL_BASE_S + PREFILL_PER_TOKEN_S * p.new_tokens
        assert p.latency_ms == pytest.approx(expect_s * 1e3, abs=1e-3)
        assert p.energy_j == pytest.approx(100.0 * expect_s, rel=1e-4)  # power x time
        assert p.cached_tokens == 0
    assert {(d.batch) for d in res.decode} == {1, 8}
    for d in res.decode:
        expect = STEP_BASE_S + STEP_PER_SEQ_S * d.batch
        assert d.step_ms == pytest.approx(expect * 1e3, abs=1e-3)  # prefill and overheads cancel
        assert d.energy_j == pytest.approx(100.0 * expect, rel=1e-4)
    # context recorded is the batch's mean total context, close to what was asked
    assert sorted(d.context_tokens for d in res.decode if d.batch == 8) == [256, 2048]
    # the engine always saw fresh prompts of the planned lengths, each decode point twice per repeat
    assert sum(1 for c in eng.calls if c[0] == "batch") == 2 * 2 * 2 * PLAN.repeats


async def test_idle_power_measured_only_with_a_real_meter() -> None:
    clock = VirtualClock()

    class IdleEngine(VirtualEngine):
        pass

    plan = SweepPlan(prefill_lengths_tokens=(64,), decode_batches=(), decode_contexts_tokens=(), idle_s=0.01)
    meter = ConstantPowerMeter(clock, power_w=42.0)

    # asyncio.sleep does not advance the virtual clock; advance it from the meter's reads instead
    class TickingMeter(ConstantPowerMeter):
        def read(self) -> MeterReading:
            clock.advance(0.5)
            return super().read()

    res = await run_sweep(IdleEngine(clock), TickingMeter(clock, 42.0), plan, energy_measured=True)
    assert res.idle_w is not None and res.idle_w > 0
    res2 = await run_sweep(IdleEngine(clock), meter, plan, energy_measured=False)
    assert res2.idle_w is None


async def test_model_meter_energy_is_modelled_and_flagged() -> None:
    clock = VirtualClock()
    tier = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    log = ActivityLog()
    meter = ModelMeter(tier, log, clock=clock)
    res = await run_sweep(VirtualEngine(clock), meter, PLAN, log, energy_measured=False)
    prof = build_profile(res, gpu="A40", model="Qwen3-0.6B", tp=1, power_cap_w=None, source="test",
                         energy_measured=False, inline_specs=False)  # fmt: skip
    assert prof.energy_measured is False and prof.idle_w is None
    # modelled prefill energy grows with the input (more modelled work) and is at least idle x latency
    e = [p.energy_j for p in prof.prefill]
    assert e[0] is not None and e[1] is not None and e[1] > e[0]
    for p in prof.prefill:
        assert p.energy_j is not None and p.energy_j >= tier.idle_w * p.latency_ms / 1e3 * 0.999
    # round trip through the file format, and the profile moves the tier model to the measured latencies
    again = parse_profile(profile_to_dict(prof))
    assert again == prof
    tm = apply_profile(tier, prof)
    for p in prof.prefill:
        assert tm.prefill_time_s(p.new_tokens) == pytest.approx(p.latency_ms / 1e3, rel=1e-6)
        assert tier.prefill_time_s(p.new_tokens) != pytest.approx(p.latency_ms / 1e3, rel=0.05)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prefill_lengths_tokens": (0,)}, "--prefill-lengths"),
        ({"decode_batches": (-1,)}, "--decode-batches"),
        ({"decode_steps": 1}, "--decode-steps"),
        ({"repeats": 0}, "--repeats"),
        ({"noise_retries": -1}, "--noise-retries"),
        ({"prefill_lengths_tokens": (), "decode_batches": ()}, "nothing to measure"),
    ],
    ids=["zero-length", "negative-batch", "one-step", "no-repeats", "negative-retries", "empty"],
)
def test_bad_plans_name_the_option(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ProfileError, match=match):
        SweepPlan(**kwargs)  # type: ignore[arg-type]


async def test_points_that_do_not_fit_the_engine_are_refused_before_running() -> None:
    clock = VirtualClock()
    eng = VirtualEngine(clock)
    eng.max_model_len_tokens = 256
    plan = SweepPlan(prefill_lengths_tokens=(64,), decode_batches=(1,), decode_contexts_tokens=(1024,))
    with pytest.raises(ProfileError, match="--decode-contexts: 1024 tokens over batch 1"):
        await run_sweep(eng, ConstantPowerMeter(clock, 1.0), plan)
    assert eng.calls == []


class StallingEngine(VirtualEngine):
    """The virtual engine, but the 1-token batch runs listed in `stall_s` (by call number) stall that long."""

    def __init__(self, clock: VirtualClock, stall_s: dict[int, float]) -> None:
        super().__init__(clock)
        self.stall_s, self.one_token_runs = stall_s, 0

    async def run_batch(self, batch: int, prompt_tokens: int, output_tokens: int) -> float:
        s = await super().run_batch(batch, prompt_tokens, output_tokens)
        if output_tokens == 1:
            self.one_token_runs += 1
            extra = self.stall_s.get(self.one_token_runs, 0.0)
            self.clock.advance(extra)
            s += extra
        return s


async def test_a_stalled_repeat_does_not_decide_the_decode_step() -> None:
    """CI saw one of two 1-token runs stall 1.2 s, which made the median per-repeat step negative."""
    clock = VirtualClock()
    plan = SweepPlan(prefill_lengths_tokens=(), decode_batches=(1,), decode_contexts_tokens=(256,),
                     decode_steps=16, repeats=2, idle_s=0.0)  # fmt: skip
    res = await run_sweep(StallingEngine(clock, {2: 1.2}), ConstantPowerMeter(clock, 1.0), plan)
    assert res.decode[0].step_ms == pytest.approx((STEP_BASE_S + STEP_PER_SEQ_S) * 1e3)


async def test_a_step_below_the_noise_is_re_measured_until_a_clean_pair() -> None:
    """CI saw both 1-token runs of a point stall >= 1.5 s: the point is re-measured instead of refused."""
    clock = VirtualClock()
    plan = SweepPlan(prefill_lengths_tokens=(), decode_batches=(1,), decode_contexts_tokens=(256,),
                     decode_steps=16, repeats=2, noise_retries=4, idle_s=0.0)  # fmt: skip
    eng = StallingEngine(clock, {1: 1.2, 2: 1.2})
    notes: list[str] = []
    res = await run_sweep(eng, ConstantPowerMeter(clock, 1.0), plan, on_point=notes.append)
    assert res.decode[0].step_ms == pytest.approx((STEP_BASE_S + STEP_PER_SEQ_S) * 1e3)
    assert eng.one_token_runs == 3  # two stalled, one clean; no retries beyond the first clean pair
    assert any("re-measuring, up to 4 more times" in n for n in notes)


async def test_a_clean_point_is_not_re_measured() -> None:
    clock = VirtualClock()
    plan = SweepPlan(prefill_lengths_tokens=(), decode_batches=(1,), decode_contexts_tokens=(256,),
                     decode_steps=16, repeats=2, noise_retries=4, idle_s=0.0)  # fmt: skip
    eng = StallingEngine(clock, {})
    await run_sweep(eng, ConstantPowerMeter(clock, 1.0), plan)
    assert eng.one_token_runs == 2


@pytest.mark.parametrize("retries", [0, 2])
async def test_a_step_below_the_noise_in_every_try_is_refused(retries: int) -> None:
    clock = VirtualClock()
    plan = SweepPlan(prefill_lengths_tokens=(), decode_batches=(1,), decode_contexts_tokens=(256,),
                     decode_steps=16, repeats=2, noise_retries=retries, idle_s=0.0)  # fmt: skip
    eng = StallingEngine(clock, {i: 1.2 for i in range(1, 10)})
    with pytest.raises(
        ProfileError, match=rf"in {2 + retries} tries .*below the timing noise. To fix: raise"
    ):
        await run_sweep(eng, ConstantPowerMeter(clock, 1.0), plan)
    assert eng.one_token_runs == 2 + retries


class SlowBatchOneEngine(VirtualEngine):
    """The virtual engine, but the first `stalled` K-token runs at batch 1 stall 0.1 s each (a loaded
    machine), and with `per_seq_s` the decode law's per-sequence slope."""

    def __init__(self, clock: VirtualClock, stalled: int, per_seq_s: float = STEP_PER_SEQ_S) -> None:
        super().__init__(clock)
        self.stalled, self.per_seq_s, self.k_runs_b1 = stalled, per_seq_s, 0

    async def run_batch(self, batch: int, prompt_tokens: int, output_tokens: int) -> float:
        s = PREFILL_BASE_S + PREFILL_PER_TOKEN_S * prompt_tokens * batch
        s += (output_tokens - 1) * (STEP_BASE_S + self.per_seq_s * batch)
        if batch == 1 and output_tokens > 1:
            self.k_runs_b1 += 1
            if self.k_runs_b1 <= self.stalled:
                s += 0.1
        self.clock.advance(s)
        self.calls.append(("batch", batch, prompt_tokens, output_tokens))
        return s


MONO_PLAN = SweepPlan(prefill_lengths_tokens=(), decode_batches=(1, 4, 8), decode_contexts_tokens=(256,),
                      decode_steps=16, repeats=2, noise_retries=3, idle_s=0.0)  # fmt: skip


async def test_a_decode_curve_not_monotone_in_batch_is_re_measured() -> None:
    """Issue 14 item 7: on a loaded machine batch 4 stepped faster than batch 1. Here both K-token runs of
    batch 1 stall (+6.7 ms per step: 17.2 ms vs 12 ms at batch 4); the re-measured curve is the engine's."""
    clock = VirtualClock()
    eng = SlowBatchOneEngine(clock, stalled=2)
    notes: list[str] = []
    res = await run_sweep(eng, ConstantPowerMeter(clock, 1.0), MONO_PLAN, on_point=notes.append)
    steps = {d.batch: d.step_ms for d in res.decode}
    for b, ms in steps.items():
        assert ms == pytest.approx((STEP_BASE_S + STEP_PER_SEQ_S * b) * 1e3, abs=1e-3)
    assert steps[1] < steps[4] < steps[8]
    assert any("not monotone in batch" in n and "batch 4" in n for n in notes)
    assert eng.k_runs_b1 == 4  # one round: 2 more run pairs at batch 1


async def test_a_decode_curve_that_stays_inverted_is_refused() -> None:
    clock = VirtualClock()
    eng = SlowBatchOneEngine(clock, stalled=0, per_seq_s=-0.001)  # batch 8 really steps faster than batch 1
    match = r"not monotone in batch beyond the 5% noise allowance .*context 256: batch 4 .* < batch 1 .*fix"
    with pytest.raises(ProfileError, match=match):
        await run_sweep(eng, ConstantPowerMeter(clock, 1.0), MONO_PLAN)
    assert eng.k_runs_b1 == 2 + 3 * 2  # the first repeats, then 3 rounds of 2


async def test_a_monotone_curve_within_noise_is_accepted_as_measured() -> None:
    clock = VirtualClock()
    eng = SlowBatchOneEngine(clock, stalled=0, per_seq_s=-0.00001)  # batch 8 0.7% faster: within 5%
    res = await run_sweep(eng, ConstantPowerMeter(clock, 1.0), MONO_PLAN)
    assert eng.k_runs_b1 == 2 and len(res.decode) == 3


class EngineClockedEngine(SlowBatchOneEngine):
    """Every K-token run at batch 1 stalls on the client's side (a loaded box), but the engine's own
    inter-token clock counts only its steps: the sweep reads the step from the engine's clock."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock, stalled=10**6)
        self.itl = DecodeClock(0.0, 0.0)

    async def run_batch(self, batch: int, prompt_tokens: int, output_tokens: int) -> float:
        s = await super().run_batch(batch, prompt_tokens, output_tokens)
        gaps = batch * (output_tokens - 1)
        step = STEP_BASE_S + self.per_seq_s * batch
        self.itl = DecodeClock(self.itl.sum_s + gaps * step, self.itl.count + gaps)
        return s

    async def decode_clock(self) -> DecodeClock | None:
        return self.itl


async def test_the_engines_own_decode_clock_decides_the_step_when_it_has_one() -> None:
    """CI (issue 14's monotone check): client-side differences gave batch 4 5.5 ms/step < batch 1 8.2 ms on
    a loaded box; the engine's inter-token clock gave 1.8-1.9 ms for both. Stalls never count."""
    clock = VirtualClock()
    eng = EngineClockedEngine(clock)
    res = await run_sweep(eng, ConstantPowerMeter(clock, 1.0), MONO_PLAN)
    steps = {d.batch: d.step_ms for d in res.decode}
    for b, ms in steps.items():
        assert ms == pytest.approx((STEP_BASE_S + STEP_PER_SEQ_S * b) * 1e3, abs=1e-9)
    assert eng.k_runs_b1 == MONO_PLAN.repeats  # nothing re-measured: the client's stalls are not the engine's


VLLM_METRICS = """# HELP vllm:inter_token_latency_seconds Histogram of inter-token latency in seconds.
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{engine="0",le="0.01",model_name="tiny-llama"} 70.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="tiny-llama"} 0.3229941340032383
vllm:inter_token_latency_seconds_count{engine="0",model_name="tiny-llama"} 75.0
vllm:inter_token_latency_seconds_sum{engine="1",model_name="tiny-llama"} 0.5
vllm:inter_token_latency_seconds_count{engine="1",model_name="tiny-llama"} 25.0
"""


def test_the_decode_clock_is_read_from_vllm_metrics() -> None:
    got = parse_decode_clock(VLLM_METRICS)
    assert got == DecodeClock(pytest.approx(0.8229941340032383), 100.0)
    old = "vllm:time_per_output_token_seconds_sum 2.0\nvllm:time_per_output_token_seconds_count 40\n"
    assert parse_decode_clock(old) == DecodeClock(2.0, 40.0)
    assert parse_decode_clock("vllm:num_requests_running 0.0\n") is None
