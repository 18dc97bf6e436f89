"""`orchestrator profile`: measure a running vLLM engine into a tier profile (fleet.yaml `tiers[].profile`).

    orchestrator profile --engine http://127.0.0.1:8100 --tier a40 --meter model --out a40.yaml \
        [--fleet fleet.yaml] [--model Qwen3-0.6B] [--prefill-lengths 32,128,512] [--decode-batches 1,4] \
        [--decode-contexts 256,1024] [--decode-steps 32] [--repeats 3] [--noise-retries 4] [--gpu-indices 0]
        [--meter-url URL]

With --fleet, --tier names a tier of that fleet (its GPU, model, tp and power cap); without it, --tier is a
catalog GPU name and --model a catalog model. Latency is always measured; energy is measured with zeus, nvml
or dcgm meters and modelled from the tier power model with `--meter model` (the file then says
`energy_measured: false`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import platform
from pathlib import Path

import typer

from orchestrator.cli.common import console, handle_errors, print_json
from orchestrator.errors import ConfigError

_MICRO_HELP = "torch GEMM and memory-bandwidth kernels across power caps -> cap curves (no engine)"


def _int_list(name: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ConfigError(
            f"{name}: {text!r} is not a comma-separated list of integers, e.g. 32,128,512"
        ) from None
    return values


def profile(
    engine: str | None = typer.Option(None, "--engine", help="base URL of a running vLLM OpenAI server"),
    tier: str | None = typer.Option(
        None, "--tier", help="tier name in --fleet, or a catalog GPU name without --fleet"
    ),
    meter: str = typer.Option("model", "--meter", help="zeus | nvml | dcgm | model"),
    out: Path = typer.Option(..., "--out", help="profile YAML to write"),
    fleet: Path | None = typer.Option(
        None, "--fleet", help="fleet.yaml whose tier (GPU, model, cap) is profiled"
    ),
    model: str | None = typer.Option(None, "--model", help="catalog model (without --fleet)"),
    tp: int = typer.Option(1, "--tp", min=1, help="tensor-parallel size of the engine"),
    power_cap_w: float | None = typer.Option(None, "--power-cap-w", help="the cap the engine's GPUs run at"),
    prefill_lengths: str = typer.Option("32,128,512", "--prefill-lengths", help="input lengths (tokens)"),
    decode_batches: str = typer.Option(
        "1,4", "--decode-batches", help="concurrent sequences per decode point"
    ),
    decode_contexts: str = typer.Option(
        "256,1024", "--decode-contexts", help="total KV tokens over the batch"
    ),
    decode_steps: int = typer.Option(32, "--decode-steps", help="tokens generated per sequence per point"),
    repeats: int = typer.Option(
        3, "--repeats", help="requests per prefill length; 1-token/K-token run pairs per decode point"
    ),
    noise_retries: int = typer.Option(
        4, "--noise-retries", help="extra run pairs for a decode point whose step is below the timing noise"
    ),
    idle_s: float = typer.Option(2.0, "--idle-s", min=0, help="idle window for idle_w (measured meters)"),
    gpu_indices: str = typer.Option("", "--gpu-indices", help="GPU indices the engine uses (zeus/nvml/dcgm)"),
    meter_url: str | None = typer.Option(None, "--meter-url", help="DCGM exporter URL (--meter dcgm)"),
    json_out: bool = typer.Option(False, "--json", help="print the profile as JSON"),
    micro: bool = typer.Option(False, "--micro", help=_MICRO_HELP),
    caps: str = typer.Option("", "--caps", help="--micro: caps to sweep in W (default: the tier's)"),
    micro_seconds: float = typer.Option(0.25, "--micro-seconds", help="--micro: s per kernel per repeat"),
) -> None:
    """Profile a running vLLM engine (prefill and decode sweeps) into a measured tier profile; with --micro,
    measure GEMM and memory-bandwidth kernels across power caps into cap curves instead."""
    if micro:  # orchestrator/cli/micro.py: no engine involved
        from orchestrator.cli.micro import profile_micro

        caps_w = tuple(float(c) for c in _int_list("--caps", caps))
        gpu_index = (_int_list("--gpu-indices", gpu_indices) or (0,))[0]
        return profile_micro(out, fleet, tier, caps_w, gpu_index, micro_seconds, repeats, json_out)
    if engine is None or tier is None:
        raise ConfigError(f"--{'engine' if engine is None else 'tier'} is required (or pass --micro)")
    from energy.meters import METER_KINDS, make_meter
    from orchestrator.profiling import ActivityLog, SweepPlan, build_profile, run_sweep
    from orchestrator.profiling_vllm import VllmHttpDriver
    from tiers.catalog import get_gpu
    from tiers.models import get_model
    from tiers.perf import TierModel
    from tiers.profiles import profile_to_dict, save_profile

    if meter not in ("zeus", "nvml", "dcgm", "model"):
        from conserve.errors import did_you_mean

        raise ConfigError(
            f"--meter: {meter!r} is not one of zeus, nvml, dcgm, model.{did_you_mean(meter, METER_KINDS)}"
        )
    plan = SweepPlan(
        prefill_lengths_tokens=_int_list("--prefill-lengths", prefill_lengths),
        decode_batches=_int_list("--decode-batches", decode_batches),
        decode_contexts_tokens=_int_list("--decode-contexts", decode_contexts),
        decode_steps=decode_steps,
        repeats=repeats,
        noise_retries=noise_retries,
        idle_s=idle_s,
    )
    if fleet is not None:
        from orchestrator.config import InlineGpu, InlineModel, load_fleet
        from orchestrator.fleet import find_tier, tier_model

        cfg = load_fleet(fleet)
        tier_cfg = find_tier(cfg, tier)
        base = tier_model(cfg, tier, power_cap_w=power_cap_w, tp=tp).without_profile()
        inline = isinstance(tier_cfg.gpu, InlineGpu) or isinstance(cfg.model, InlineModel)
    else:
        if model is None:
            raise ConfigError("--model is required without --fleet (a catalog model, e.g. Qwen3-0.6B)")
        gpu = get_gpu(tier)
        cap = None if power_cap_w is None or power_cap_w >= gpu.tdp_w else power_cap_w
        base = TierModel(gpu=gpu, model=get_model(model), tp=tp, power_cap_w=cap)
        inline = False
    activity = ActivityLog()
    m = make_meter(
        meter, meter_id=f"profile-{meter}", gpu_indices=_int_list("--gpu-indices", gpu_indices),
        url=meter_url, tier=base, activity=activity,
    )  # fmt: skip
    measured = str(m.source) != "modelled"

    async def go() -> tuple[object, str]:
        async with VllmHttpDriver(engine, seed=plan.seed) as driver:
            note = (lambda s: None) if json_out else (lambda s: console.print(f"  {s}"))
            res = await run_sweep(driver, m, plan, activity, energy_measured=measured, on_point=note)
            return res, driver.version

    if not json_out:
        console.print(f"profiling {engine} as tier {tier} ({base.name}, {base.model.name}); meter {meter}")
    try:
        result, version = asyncio.run(go())
    finally:
        m.close()
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    energy_note = "measured" if measured else "modelled from the tier power model (not measured)"
    source = (f"orchestrator profile of {engine} (vLLM {version}) on host {platform.node()}, {when}; "
              f"latency measured, energy {energy_note} by meter {meter}")  # fmt: skip
    prof = build_profile(
        result,  # type: ignore[arg-type]
        gpu=base.gpu.name, model=base.model.name, tp=base.tp, power_cap_w=base.power_cap_w, source=source,
        energy_measured=measured, inline_specs=inline,
    )  # fmt: skip
    save_profile(prof, out)
    if json_out:
        print_json({"out": str(out), "elapsed_s": round(result.elapsed_s, 2), **profile_to_dict(prof)})  # type: ignore[attr-defined]
        return
    from rich.table import Table

    t = Table(title=f"prefill ({'measured' if measured else 'modelled'} energy)")
    for c in ("new_tokens", "latency_ms", "energy_j", "roofline_ms"):
        t.add_column(c, justify="right")
    for p in prof.prefill:
        t.add_row(str(p.new_tokens), f"{p.latency_ms:.2f}", f"{p.energy_j or float('nan'):.4g}",
                  f"{base.prefill_time_s(p.new_tokens) * 1e3:.2f}")  # fmt: skip
    console.print(t)
    t = Table(title="decode steps")
    for c in ("batch", "context_tokens", "step_ms", "energy_j", "roofline_ms"):
        t.add_column(c, justify="right")
    for d in prof.decode:
        t.add_row(str(d.batch), str(d.context_tokens), f"{d.step_ms:.3f}",
                  f"{d.energy_j or float('nan'):.4g}",
                  f"{base.decode_step_time_s(d.batch, d.context_tokens) * 1e3:.3f}")  # fmt: skip
    console.print(t)
    console.print(
        f"wrote {out} in {result.elapsed_s:.1f} s"  # type: ignore[attr-defined]
        + ("" if measured else " (energy_measured: false: energy is modelled, latency is real)")
    )


def register(app: typer.Typer) -> None:
    app.command("profile")(handle_errors(profile))
