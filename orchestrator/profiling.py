"""The tier profiler (``orchestrator profile``): drive a running vLLM engine through a prefill and a decode
sweep, measure latency (and energy from a meter) per point, and produce the measured profile of
tiers/profiles.py. It lives beside the commands that measure (it reads energy/ meters and talks HTTP), so the
model layer tiers/ imports nothing above it (issue 11 item 6).

    prefill sweep   for each input length n: `repeats` one-token completions of n fresh tokens (no
                    prefix-cache hit possible); latency_ms = median client-side latency;
                    energy_j = meter delta / repeats.
    decode sweep    for each (batch B, total context C): B concurrent requests with fresh prompts of
                    p = C/B - K/2 tokens, once generating 1 token and once exactly K tokens (ignore_eos).
                    When the engine keeps its own clock of decoding (vLLM's inter-token latency histogram,
                    stamped by the engine core per step), step_ms = median over repeats of that clock's mean
                    over the K-token run (sum delta / count delta): the time of one decode step of the whole
                    batch as the engine measured it, free of HTTP and client scheduling. Otherwise
                    step_ms = (min over repeats of T_K - min over repeats of T_1) / (K - 1) from the client's
                    wall times (differential, so prefill and HTTP costs cancel; the fastest run is the least
                    disturbed one, as noise only adds time; streamed chunk times are not used because vLLM
                    delivers a fast model's tokens in bursts). The client-side difference proved too noisy on
                    a loaded 2-core box: CI measured batch 4 at 5.5 ms/step and batch 1 at 8.2 ms (10 runs
                    each), while the engine's own clock gave 1.8-1.9 ms for both at contexts 128 and 512.
                    When a differential step is not positive the point is re-measured, up to
                    `noise_retries` more repeats, before it is refused. A decode curve not monotone in
                    batch at one context (a larger batch stepping faster than a smaller one by more than
                    `monotone_tolerance`) is re-measured, both points, up to `noise_retries` rounds, then
                    refused. context_tokens records the batch's mean total
                    context B * (p + K/2); energy_j = median over repeats of (E_K - E_1) / (K - 1) from the
                    meter.
    idle            with a measured meter: idle_w = energy over `idle_s` seconds of no requests / idle_s.

Energy comes from an energy/meters.py Meter (zeus, nvml, dcgm: measured; model: the tier power model and the
activity the profiler reports, Source.MODELLED). With a modelled meter the profile says
``energy_measured: false`` (tiers/profiles.py then ignores its energy values) and no idle_w is written.

The sweep core (:func:`run_sweep`) talks to an :class:`EngineDriver` Protocol; the aiohttp implementation for
a vLLM OpenAI server is orchestrator/profiling_vllm.py's :class:`VllmHttpDriver`. Must not import fastapi,
sqlalchemy or httpx.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tiers.errors import ProfileError
from tiers.profiles import DecodePoint, MeasuredProfile, PrefillPoint

if TYPE_CHECKING:
    from energy.meters import Activity, Meter


@dataclass(frozen=True, slots=True)
class SweepPlan:
    prefill_lengths_tokens: tuple[int, ...] = (32, 128, 512)
    decode_batches: tuple[int, ...] = (1, 4)
    decode_contexts_tokens: tuple[int, ...] = (256, 1024)  # total KV tokens over the batch
    decode_steps: int = 32  # tokens generated per sequence at each decode point
    repeats: int = 3  # prefill requests per length; (1-token, K-token) run pairs per decode point
    noise_retries: int = 4  # extra run pairs for a decode point whose step is still below the timing noise
    # (and rounds of re-measuring a decode curve that is not monotone in batch)
    # a larger batch may step faster than a smaller one by this fraction before it counts as noise: a step of
    # more sequences over the same total KV does at least the same work
    monotone_tolerance: float = 0.05
    idle_s: float = 2.0  # idle window for idle_w (measured meters only)
    seed: int = 0

    def __post_init__(self) -> None:
        def positive(name: str, values: Sequence[int]) -> None:
            if any(v < 1 for v in values):
                raise ProfileError(f"{name}: every value must be >= 1, got {list(values)}")

        positive("--prefill-lengths", self.prefill_lengths_tokens)
        positive("--decode-batches", self.decode_batches)
        positive("--decode-contexts", self.decode_contexts_tokens)
        if not self.prefill_lengths_tokens and not (self.decode_batches and self.decode_contexts_tokens):
            raise ProfileError(
                "nothing to measure: give --prefill-lengths or --decode-batches and --decode-contexts"
            )
        if self.decode_steps < 2:
            raise ProfileError(
                f"--decode-steps must be >= 2 (a step time needs two tokens), got {self.decode_steps}"
            )
        if self.repeats < 1:
            raise ProfileError(f"--repeats must be >= 1, got {self.repeats}")
        if self.noise_retries < 0:
            raise ProfileError(f"--noise-retries must be >= 0, got {self.noise_retries}")
        if not 0 <= self.monotone_tolerance < 1:
            raise ProfileError(f"monotone_tolerance must be in [0, 1), got {self.monotone_tolerance}")

    def decode_prompt_tokens(self, batch: int, context_tokens: int) -> int:
        """Per-sequence prompt so that the batch's mean total context over the K steps is context_tokens."""
        return max(1, round(context_tokens / batch - self.decode_steps / 2))

    def check_fits(self, max_model_len_tokens: int) -> None:
        for n in self.prefill_lengths_tokens:
            if n + 1 > max_model_len_tokens:
                raise ProfileError(
                    f"--prefill-lengths: {n} tokens (+1 generated) exceed the engine's max_model_len "
                    f"{max_model_len_tokens}. To fix: use lengths below it."
                )
        for b in self.decode_batches:
            for c in self.decode_contexts_tokens:
                p = self.decode_prompt_tokens(b, c)
                if p + self.decode_steps > max_model_len_tokens:
                    raise ProfileError(
                        f"--decode-contexts: {c} tokens over batch {b} means {p}+{self.decode_steps} "
                        f"tokens per sequence, more than the engine's max_model_len {max_model_len_tokens}. "
                        "To fix: lower the context or raise the batch."
                    )


class EngineDriver(Protocol):
    max_model_len_tokens: int

    async def prefill_once(self, new_tokens: int) -> float:
        """Latency (s) of one request of `new_tokens` fresh prompt tokens generating one token."""
        ...

    async def run_batch(self, batch: int, prompt_tokens: int, output_tokens: int) -> float:
        """Wall time (s) of `batch` concurrent fresh-prompt requests, each making exactly output_tokens."""
        ...

    async def decode_clock(self) -> DecodeClock | None:
        """The engine's own cumulative inter-token latency, or None when the engine keeps no such clock
        (the sweep then times decode steps from the client's wall times)."""
        ...


@dataclass(frozen=True, slots=True)
class DecodeClock:
    """Cumulative inter-token latency as the engine counts it: the sum of the gaps (s) and their number."""

    sum_s: float
    count: float


class ActivityLog:
    """What the profiler made the engine do since the last read: the activity source of a ModelMeter."""

    def __init__(self) -> None:
        self._pending: list[Activity] = []

    def add(self, activity: Activity) -> None:
        self._pending.append(activity)

    def __call__(self, start: Any, end: Any) -> Activity:
        from energy.meters import Activity

        acts, self._pending = self._pending, []
        if not acts:
            return Activity()
        decode_tokens = sum(a.decode_tokens for a in acts)
        weight = decode_tokens or 1
        return Activity(
            prefill_tokens=sum(a.prefill_tokens for a in acts),
            cached_tokens=sum(a.cached_tokens for a in acts),
            decode_tokens=decode_tokens,
            decode_batch=sum(a.decode_batch * a.decode_tokens for a in acts) / weight
            if decode_tokens
            else 1.0,
            decode_context_tokens=(
                sum(a.decode_context_tokens * a.decode_tokens for a in acts) / weight
                if decode_tokens
                else 0.0
            ),
        )


def _total_j(meter: Meter) -> float:
    return float(sum(meter.read().cumulative_j.values()))


@dataclass(slots=True)
class SweepResult:
    prefill: list[PrefillPoint] = field(default_factory=list)
    decode: list[DecodePoint] = field(default_factory=list)
    idle_w: float | None = None
    elapsed_s: float = 0.0


async def run_sweep(
    driver: EngineDriver,
    meter: Meter,
    plan: SweepPlan,
    activity: ActivityLog | None = None,
    energy_measured: bool = True,
    on_point: Callable[[str], None] | None = None,
) -> SweepResult:
    """Measure every point of `plan` on `driver`, energy from `meter` (activity feeds a model meter)."""
    from energy.meters import Activity

    plan.check_fits(driver.max_model_len_tokens)
    log = activity or ActivityLog()
    out = SweepResult()
    t_start = time.monotonic()
    await driver.prefill_once(8)  # warm-up: first request pays one-off costs
    _total_j(meter)
    log(None, None)  # drop the warm-up's activity

    if energy_measured and plan.idle_s > 0:
        e0, t0 = _total_j(meter), time.monotonic()
        await asyncio.sleep(plan.idle_s)
        out.idle_w = (_total_j(meter) - e0) / (time.monotonic() - t0)

    for n in plan.prefill_lengths_tokens:
        e0 = _total_j(meter)
        lat: list[float] = []
        for _ in range(plan.repeats):
            log.add(Activity(prefill_tokens=n))
            lat.append(await driver.prefill_once(n))
        energy_j = (_total_j(meter) - e0) / plan.repeats
        out.prefill.append(PrefillPoint(n, 0, round(statistics.median(lat) * 1e3, 4), _positive(energy_j)))
        if on_point:
            on_point(f"prefill {n} tokens: {statistics.median(lat) * 1e3:.1f} ms")

    points: dict[tuple[int, int], _DecodeRuns] = {}
    for b in plan.decode_batches:
        for c in plan.decode_contexts_tokens:
            runs = _DecodeRuns(b, c, plan.decode_prompt_tokens(b, c), plan.decode_steps)
            await _measure_decode(driver, meter, log, plan, runs, on_point)
            points[(b, c)] = runs
    await _check_monotone_in_batch(driver, meter, log, plan, points, on_point)
    for (b, _c), runs in points.items():
        step_s = runs.step_s()
        out.decode.append(
            DecodePoint(b, round(runs.mean_context), round(step_s * 1e3, 4), _positive(runs.step_j()))
        )
        if on_point:
            on_point(f"decode batch {b} x context {round(runs.mean_context)}: {step_s * 1e3:.3f} ms/step")
    out.elapsed_s = time.monotonic() - t_start
    return out


@dataclass(slots=True)
class _DecodeRuns:
    """Every (1-token, K-token) run pair of one decode point; the step uses the fastest run on each side."""

    batch: int
    context_tokens: int
    prompt_tokens: int
    steps: int
    t_1s: list[float] = field(default_factory=list)
    t_ks: list[float] = field(default_factory=list)
    steps_j: list[float] = field(default_factory=list)
    engine_steps_s: list[float] = field(default_factory=list)  # the engine's own clock, per K-token run

    @property
    def mean_context(self) -> float:
        return self.batch * (self.prompt_tokens + self.steps / 2)

    def step_s(self) -> float:
        if self.engine_steps_s and len(self.engine_steps_s) == len(self.t_ks):
            return statistics.median(self.engine_steps_s)
        # Fastest of the runs on each side: noise (a preempted core, a GC pause) only adds time, so the
        # minimum is the least disturbed run. A median of per-repeat differences failed in CI when one 1-token
        # run of two stalled 1.2 s (steps [0.014, -0.082] s, median < 0); later both 1-token runs of a point
        # stalled >= 1.5 s on a box kept busy by two idle NIXL engines, hence the retries.
        return (min(self.t_ks) - min(self.t_1s)) / (self.steps - 1) if self.t_ks else 0.0

    def step_j(self) -> float:
        return statistics.median(self.steps_j)


async def _decode_pair(driver: EngineDriver, meter: Meter, log: ActivityLog, r: _DecodeRuns) -> None:
    from energy.meters import Activity

    b, p, k = r.batch, r.prompt_tokens, r.steps
    e0 = _total_j(meter)
    log.add(Activity(prefill_tokens=b * p))
    t_1 = await driver.run_batch(b, p, 1)
    e1 = _total_j(meter)
    log.add(Activity(prefill_tokens=b * p))
    log.add(Activity(decode_tokens=b * (k - 1), decode_batch=b, decode_context_tokens=r.mean_context))
    c0 = await driver.decode_clock()
    t_k = await driver.run_batch(b, p, k)
    c1 = await driver.decode_clock()
    e2 = _total_j(meter)
    r.t_1s.append(t_1)
    r.t_ks.append(t_k)
    if c0 is not None and c1 is not None and c1.count > c0.count:
        r.engine_steps_s.append((c1.sum_s - c0.sum_s) / (c1.count - c0.count))
    r.steps_j.append(((e2 - e1) - (e1 - e0)) / (k - 1))


async def _measure_decode(
    driver: EngineDriver,
    meter: Meter,
    log: ActivityLog,
    plan: SweepPlan,
    r: _DecodeRuns,
    on_point: Callable[[str], None] | None,
) -> None:
    """`plan.repeats` run pairs, plus up to `noise_retries` more while the step is not positive."""
    k = plan.decode_steps
    while len(r.t_ks) < plan.repeats or (r.step_s() <= 0 and len(r.t_ks) < plan.repeats + plan.noise_retries):
        await _decode_pair(driver, meter, log, r)
        if len(r.t_ks) == plan.repeats and r.step_s() <= 0 and plan.noise_retries and on_point:
            on_point(
                f"decode batch {r.batch} x context {round(r.mean_context)}: {k} tokens no slower than 1 "
                f"token so far (timing noise); re-measuring, up to {plan.noise_retries} more times"
            )
    if r.step_s() <= 0:
        raise ProfileError(
            f"decode batch {r.batch} x context {r.context_tokens}: {k} tokens took no longer than 1 token in "
            f"{len(r.t_ks)} tries ({k}-token runs {_seconds(r.t_ks)} s, 1-token runs {_seconds(r.t_1s)} s); "
            "the step is below the timing noise. To fix: raise --decode-steps, --repeats or "
            "--noise-retries, or profile on a quieter machine."
        )


def _batch_inversions(
    plan: SweepPlan, points: dict[tuple[int, int], _DecodeRuns]
) -> list[tuple[_DecodeRuns, _DecodeRuns]]:
    """(smaller batch, larger batch) pairs at one context whose larger batch steps faster beyond the noise
    allowance: a step of more sequences over the same total context does at least the same work."""
    out = []
    for c in plan.decode_contexts_tokens:
        curve = sorted((r for (_b, cc), r in points.items() if cc == c), key=lambda r: r.batch)
        for i, lo in enumerate(curve):
            for hi in curve[i + 1 :]:
                if hi.step_s() < lo.step_s() * (1.0 - plan.monotone_tolerance):
                    out.append((lo, hi))
    return out


async def _check_monotone_in_batch(
    driver: EngineDriver,
    meter: Meter,
    log: ActivityLog,
    plan: SweepPlan,
    points: dict[tuple[int, int], _DecodeRuns],
    on_point: Callable[[str], None] | None,
) -> None:
    """Issue 14: on a loaded machine a decode step at batch 4 came out faster than at batch 1. Both points of
    every such inversion get `repeats` more run pairs (their fastest runs only improve), up to `noise_retries`
    rounds; an inversion that survives is refused."""
    for _round in range(plan.noise_retries):
        bad = _batch_inversions(plan, points)
        if not bad:
            return
        again = {id(r): r for pair in bad for r in pair}
        if on_point:
            on_point(
                "decode steps not monotone in batch ("
                + "; ".join(_inversion(lo, hi) for lo, hi in bad)
                + f"): re-measuring {len(again)} points"
            )
        for r in again.values():
            for _ in range(plan.repeats):
                await _decode_pair(driver, meter, log, r)
    bad = _batch_inversions(plan, points)
    if bad:
        raise ProfileError(
            "decode steps are not monotone in batch beyond the "
            f"{plan.monotone_tolerance:.0%} noise allowance after re-measuring: "
            + "; ".join(_inversion(lo, hi) for lo, hi in bad)
            + ". To fix: profile on a quieter machine, or raise --repeats or --noise-retries."
        )


def _inversion(lo: _DecodeRuns, hi: _DecodeRuns) -> str:
    return (
        f"context {lo.context_tokens}: batch {hi.batch} {hi.step_s() * 1e3:.3f} ms/step < batch {lo.batch} "
        f"{lo.step_s() * 1e3:.3f} ms/step ({len(hi.t_ks)} and {len(lo.t_ks)} runs)"
    )


def _seconds(times: Sequence[float]) -> str:
    return ", ".join(f"{t:.4f}" for t in times)


def _positive(energy_j: float | None) -> float | None:
    """Profiles store energy > 0; a meter too coarse to see the point gives None (not a fake zero)."""
    return round(energy_j, 6) if energy_j is not None and energy_j > 0 else None


def build_profile(
    result: SweepResult,
    *,
    gpu: str,
    model: str,
    tp: int,
    power_cap_w: float | None,
    source: str,
    energy_measured: bool,
    inline_specs: bool,
) -> MeasuredProfile:
    if not result.prefill and not result.decode:
        raise ProfileError("the sweep measured no points")
    return MeasuredProfile(
        gpu=gpu,
        model=model,
        tp=tp,
        power_cap_w=power_cap_w,
        source=source,
        energy_measured=energy_measured,
        prefill=tuple(result.prefill),
        decode=tuple(result.decode),
        idle_w=round(result.idle_w, 4) if energy_measured and result.idle_w and result.idle_w > 0 else None,
        inline_specs=inline_specs,
    )
