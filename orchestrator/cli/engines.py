"""`orchestrator engines up|down|status`: local vLLM servers for a fleet's `engines:` list (dev and tests).

`up` starts one vLLM OpenAI server per engine entry whose url is on this host (port from the url; prefill and
decode roles get the NixlConnector and a NIXL side-channel port; engine i is pinned to core i), waits for
/health, and records the process ids in a state file that `down` reads to stop them (process groups).
Engines with a power cap (fleet.yaml `engines[].power_cap_w`, `--plan`, or a tier's single cap) get it
through NVML before they start (orchestrator/power.py); `down` restores the previous limits.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from orchestrator.cli.common import console, err_console, handle_errors, print_json
from orchestrator.config import FleetConfig, load_fleet
from orchestrator.engines import launcher
from orchestrator.errors import ConfigError
from placement.base import Role

_STATE_HELP = "state file written by `engines up`"
_POWER_STATE_HELP = "power-cap state file (default ~/.cache/conserve/power-caps.json)"
_COLS = ("id", "role", "tier", "url", "pid", "side_channel_port", "cpu_core", "log")


def up(
    fleet: Path = typer.Option(..., "--fleet", help="fleet.yaml with an engines: list (id, tier, role, url)"),
    model: Path | None = typer.Option(
        None, "--model", help="model directory for vLLM (default: build the tiny random test model, cached)"
    ),
    vllm_python: Path | None = typer.Option(
        None, "--vllm-python", help="python of the vllm venv (default: $CONSERVE_VLLM_PYTHON, then the cache)"
    ),
    log_dir: Path = typer.Option(
        launcher.DEFAULT_CACHE / "engine-logs", "--log-dir", help="directory for one log per engine"
    ),
    state: Path = typer.Option(launcher.DEFAULT_STATE_FILE, "--state", help="where to record the pids"),
    side_channel_base: int = typer.Option(
        launcher.DEFAULT_SIDE_CHANNEL_BASE, "--side-channel-base", help="first NIXL side-channel port"
    ),
    max_model_len: int = typer.Option(1024, "--max-model-len", min=16, help="vLLM --max-model-len (tokens)"),
    timeout_s: float = typer.Option(launcher.DEFAULT_STARTUP_TIMEOUT_S, "--timeout", help="seconds to wait"),
    plan: Path | None = typer.Option(None, "--plan", help="plan.yaml whose pools give engines power caps"),
    power_state: Path | None = typer.Option(None, "--power-state", help=_POWER_STATE_HELP),
    json_out: bool = typer.Option(False, "--json", help="print JSON for scripts"),
) -> None:
    """Start local vLLM engines for the fleet (power caps applied first) and wait until they are healthy."""
    cfg = load_fleet(fleet)
    if not cfg.engines:
        raise ConfigError(f"{fleet}: no engines: list. To fix: add entries with id, tier, role and url.")
    running = [p for p in launcher.load_state(state) if launcher.is_vllm_process(p.pid)]
    if running:
        ids = [p.spec.engine_id for p in running]
        raise ConfigError(
            f"engines from an earlier `engines up` are still running ({ids}). "
            "To fix: run `orchestrator engines down` first."
        )
    python = launcher.resolve_vllm_python(vllm_python)
    if model is None:
        model = launcher.DEFAULT_CACHE / "tiny-model"
        if not (model / "config.json").exists():
            if not json_out:
                console.print(f"building the tiny random test model in {model} ...")
            launcher.build_tiny_model(python, model)
    specs = launcher.specs_from_urls(
        [(e.id, e.tier, Role(e.role), e.url) for e in cfg.engines], side_channel_base=side_channel_base
    )
    settings = launcher.LaunchSettings(
        python=python,
        model_dir=model,
        log_dir=log_dir,
        served_model_names=(cfg.model_spec().name,),  # what `orchestrator serve` forwards
        max_model_len_tokens=max_model_len,
        startup_timeout_s=timeout_s,
    )
    t0 = time.monotonic()

    def ready(p: launcher.EngineProcess, secs: float) -> None:
        if not json_out:
            console.print(f"  {p.spec.engine_id} ({p.spec.role.value}) healthy at {p.url} after {secs:.0f} s")

    caps = _apply_power_caps(cfg, plan, power_state, json_out)
    if not json_out:
        console.print(f"starting {len(specs)} vLLM engines with {python} (logs in {log_dir}) ...")
    try:
        procs = launcher.start_engines(specs, settings, on_ready=ready)
    except BaseException:
        _restore_power_caps(power_state, json_out)
        raise
    launcher.save_state(state, procs)
    rows = [
        {"id": p.spec.engine_id, "role": p.spec.role.value, "tier": p.spec.tier, "url": p.url, "pid": p.pid,
         "side_channel_port": p.spec.side_channel_port, "cpu_core": p.spec.cpu_core, "log": str(p.log_path)}
        for p in procs
    ]  # fmt: skip
    if json_out:
        print_json({"engines": rows, "startup_s": round(time.monotonic() - t0, 1), "state": str(state),
                    "power_caps": [r.to_dict() for r in caps]})  # fmt: skip
        return
    from rich.table import Table

    table = Table(title=f"vLLM engines up in {time.monotonic() - t0:.0f} s (stop: orchestrator engines down)")
    for col in _COLS:
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r[c]) for c in _COLS))
    console.print(table)


def down(
    state: Path = typer.Option(launcher.DEFAULT_STATE_FILE, "--state", help=_STATE_HELP),
    power_state: Path | None = typer.Option(None, "--power-state", help=_POWER_STATE_HELP),
    json_out: bool = typer.Option(False, "--json", help="print JSON for scripts"),
) -> None:
    """Stop the engines that `engines up` started (SIGTERM to each process group, then SIGKILL) and restore
    the GPU power limits it changed."""
    procs = launcher.load_state(state)
    stopped, gone = [], []
    for p in procs:
        if launcher.is_vllm_process(p.pid):
            launcher.stop_engine(p)
            stopped.append(p.spec.engine_id)
        else:
            gone.append(p.spec.engine_id)
    if state.exists():
        state.unlink()
    restored = _restore_power_caps(power_state, json_out)
    if json_out:
        power = [r.to_dict() for r in restored]
        print_json({"stopped": stopped, "already_gone": gone, "power_restored": power})
    else:
        console.print(f"stopped {stopped or 'nothing'}" + (f"; already gone: {gone}" if gone else ""))


def status(
    state: Path = typer.Option(launcher.DEFAULT_STATE_FILE, "--state", help=_STATE_HELP),
    json_out: bool = typer.Option(False, "--json", help="print JSON for scripts"),
) -> None:
    """Show the engines `engines up` started and whether they answer /health."""
    rows = [
        {"id": p.spec.engine_id, "role": p.spec.role.value, "url": p.url, "pid": p.pid,
         "alive": launcher.is_vllm_process(p.pid), "healthy": launcher._healthy(p.url)}
        for p in launcher.load_state(state)
    ]  # fmt: skip
    if json_out:
        print_json({"engines": rows})
        return
    if not rows:
        console.print("no engines recorded (start some with `orchestrator engines up --fleet FILE`)")
    for r in rows:
        console.print(f"{r['id']:>12} {r['role']:>9} {r['url']} pid {r['pid']} alive={r['alive']} "
                      f"healthy={r['healthy']}")  # fmt: skip


def _apply_power_caps(cfg: FleetConfig, plan: Path | None, state: Path | None, quiet: bool) -> list[Any]:
    """Apply the fleet's caps for `engines up` (holder "engines": kept until `engines down`); a cap that
    cannot be applied is reported and the engines start anyway."""
    from energy.power import DEFAULT_STATE_FILE, Holder, apply_caps
    from orchestrator.fleet import load_plan
    from orchestrator.power import cap_requests, engine_caps

    requests, results = cap_requests(engine_caps(cfg, load_plan(plan) if plan is not None else None))
    if requests:
        holder = Holder("engines", label="orchestrator engines up")
        results += apply_caps(requests, holder, state_path=state or DEFAULT_STATE_FILE)
    for r in results if not quiet else ():
        if r.status.in_force:
            console.print(f"  power cap {r.engine_id}: GPU {r.gpu_index} at {r.applied_w:g} W ({r.status})")
        else:
            err_console.print(f"[yellow]warning:[/] power cap of {r.engine_id} NOT applied ({r.status}): "
                              f"{escape(r.message)}", highlight=False, soft_wrap=True)  # fmt: skip
    return results


def _restore_power_caps(power_state: Path | None, quiet: bool) -> list[Any]:
    from energy.errors import EnergyError
    from energy.power import DEFAULT_STATE_FILE, Holder, restore_caps

    try:
        results = restore_caps(Holder("engines"), state_path=power_state or DEFAULT_STATE_FILE)
    except EnergyError as err:
        err_console.print(f"[yellow]warning:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return []
    for r in results if not quiet else ():
        back = f"  power limit of GPU {r.gpu_index} back to {_w(r.applied_w)} W ({r.status})"
        console.print(back, r.message)
    return results


def _w(v: float | None) -> str:
    return "?" if v is None else f"{v:g}"


def register(app: typer.Typer) -> None:
    engines_app = typer.Typer(help="Start/stop local vLLM engines for a fleet (development and tests).")
    engines_app.command("up")(handle_errors(up))
    engines_app.command("down")(handle_errors(down))
    engines_app.command("status")(handle_errors(status))
    app.add_typer(engines_app, name="engines")
